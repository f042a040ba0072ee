"""The text corpus the project trains its own MoE language model on: domains, a deterministic
train / held-out split, a byte-level BPE tokenizer trained locally, and token arrays per domain.

The corpus is ``../shared/data/corpus/`` (see that folder's README for sources and licences): five
OLMoE routing-analysis domains, WikiText-2 and Tiny Shakespeare. A file's tail that repeats its
beginning (every OLMoE file has one) is dropped; then every file is split by bytes: the last
``HELD_OUT_FRACTION`` of it, starting at a line boundary, is held out and never trained on (the
tokenizer included), so held-out perplexity and routing statistics are measured on unseen text.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS_DIR = REPO_ROOT.parent / "shared" / "data" / "corpus"

EOS_TOKEN = "<|endoftext|>"
HELD_OUT_FRACTION = 0.05

# domain -> the corpus files it is made of, in a fixed order
DOMAIN_FILES: dict[str, tuple[str, ...]] = {
    "arxiv": ("olmoe-arxiv_texts.txt",),
    "b3g": ("olmoe-b3g_texts.txt",),
    "c4": ("olmoe-c4_texts.txt",),
    "github": ("olmoe-github_oss_with_stack_texts.txt",),
    "wikipedia": ("olmoe-wikipedia_texts.txt",),
    "wikitext": ("wikitext-2-valid.txt", "wikitext-2-test.txt"),
    "shakespeare": ("tinyshakespeare.txt",),
}
DOMAINS: tuple[str, ...] = tuple(DOMAIN_FILES)


@dataclass(frozen=True)
class DomainText:
    """One domain's documents (one per corpus file: the files carry no document separators)."""
    train: tuple[str, ...]
    held_out: tuple[str, ...]


def split_bytes(data: bytes, held_out_fraction: float = HELD_OUT_FRACTION) -> tuple[bytes, bytes]:
    """Cut ``data`` into (train, held_out): held_out starts at the first line start at or after
    ``(1 - held_out_fraction) * len(data)`` bytes, so both halves are whole lines (and valid UTF-8)."""
    cut = int(len(data) * (1.0 - held_out_fraction))
    if cut > 0 and data[cut - 1:cut] != b"\n":
        newline = data.find(b"\n", cut)
        cut = len(data) if newline < 0 else newline + 1
    return data[:cut], data[cut:]


def drop_repeated_tail(data: bytes) -> bytes:
    """The file without a tail that repeats its own beginning byte for byte. Each OLMoE text file is
    its documents followed by a second copy of their first part; without this, "held-out" text would
    also be training text."""
    probe = data[:256]
    start = data.find(probe, 1) if probe else -1
    while start != -1:
        if data[start:] == data[:len(data) - start]:
            return data[:start]
        start = data.find(probe, start + 1)
    return data


def load_corpus(corpus_dir: str | os.PathLike = DEFAULT_CORPUS_DIR,
                max_chars_per_domain: int | None = None) -> dict[str, DomainText]:
    """Read every domain and split it. ``max_chars_per_domain`` keeps the first characters of each
    split's documents (small CPU runs); the split itself is always made on the whole file."""
    corpus_dir = Path(corpus_dir)
    missing = [name for files in DOMAIN_FILES.values() for name in files if not (corpus_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"corpus folder {corpus_dir} lacks {', '.join(missing)}: pass --corpus DIR pointing at a copy of "
            f"shared/data/corpus/ (see shared/data/README.md)")
    domains = {}
    for domain, files in DOMAIN_FILES.items():
        train, held_out = [], []
        for name in files:
            tr, ho = split_bytes(drop_repeated_tail((corpus_dir / name).read_bytes()))
            train.append(tr.decode("utf-8"))
            held_out.append(ho.decode("utf-8"))
        if max_chars_per_domain is not None:
            per_doc = max_chars_per_domain // len(files)
            train = [t[:per_doc] for t in train]
            held_out = [t[:per_doc] for t in held_out]
        domains[domain] = DomainText(train=tuple(train), held_out=tuple(held_out))
    return domains


def train_tokenizer(texts, vocab_size: int = 8192) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: every byte is a base symbol, so any text round-trips exactly)
    trained on ``texts`` (an iterable of strings); ``<|endoftext|>`` is token 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``directory``
    so that ``AutoTokenizer.from_pretrained(directory)`` gives a ``PreTrainedTokenizerFast``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {str(eos_id): {"content": EOS_TOKEN, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}},
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def encode_corpus(tokenizer: Tokenizer, domain_texts: dict[str, tuple[str, ...] | list[str]]) -> dict[str, np.ndarray]:
    """Token ids per domain as uint16: the domain's documents, each followed by ``<|endoftext|>``."""
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if tokenizer.get_vocab_size() > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocabulary of {tokenizer.get_vocab_size()} tokens does not fit uint16")
    out = {}
    for domain, docs in domain_texts.items():
        parts = []
        for doc in docs:
            encoded = tokenizer.encode_batch(_chunks(doc), add_special_tokens=False)
            parts.extend(np.asarray(enc.ids, dtype=np.uint16) for enc in encoded)
            parts.append(np.asarray([eos_id], dtype=np.uint16))
        out[domain] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    return out


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Pieces of about ``size`` characters, cut only after a newline with a non-space character on
    both sides. The byte-level pre-tokenizer makes such a newline a pre-token of its own, at the end
    of a piece as in the whole text, so the pieces encode to exactly the tokens of the whole text and
    ``encode_batch`` runs them in parallel."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut - 2].isspace()
                                       and not text[cut].isspace()):
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces
