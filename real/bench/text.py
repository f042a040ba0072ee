"""The text the engine commands decode: held-out prompts (the measured run), training-split prompts
(the slice ``static`` and ``affinity`` learn from, in the engine and the simulator alike) and held-out
windows that score a lossy policy's accuracy, all from the checkpoint's tokenizer and the corpus."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from traces import Trace


def load_text(tokenizer_dir: Path, corpus: Path):
    """(tokenizer, corpus domains), loaded once for the prompts and the scored windows."""
    from transformers import AutoTokenizer
    from real.corpus import load_corpus
    return AutoTokenizer.from_pretrained(tokenizer_dir), load_corpus(corpus)


def _prompt(tok, text: str, length: int) -> list[int]:
    """The first ``length`` tokens of ``text`` (fewer when it holds fewer). It tokenizes a head of the text, at
    least 4,000 characters (what a prompt of the usual lengths needs; the same tokens as before longer prompts
    were allowed) and 16 per token asked; ``verbose=False``: that head may be longer than the tokenizer's
    ``model_max_length``, which warns though nothing here feeds it to a model whole."""
    return tok(text[:max(4000, 16 * length)], verbose=False)["input_ids"][:length]


def held_out_prompts(tok, domains, count: int, length: int) -> list[list[int]]:
    """The start of the held-out text of ``count`` corpus domains (sorted by name), ``length`` tokens each."""
    return [_prompt(tok, domains[d].held_out[0], length) for d in sorted(domains)[:count]]


def train_prompts(tok, domains, count: int, length: int) -> list[list[int]]:
    """The same from the training split: text the measured prompts never share, so a policy that learns
    from its decode (``static``, ``affinity``) is measured on routing it did not see."""
    return [_prompt(tok, domains[d].train[0], length) for d in sorted(domains)[:count]]


def prompt_problem(tok, domains, prompts: int, train: int, length: int) -> str | None:
    """Why ``held_out_prompts(tok, domains, prompts, length)`` or ``train_prompts(..., train, ...)`` would not give
    as many prompts as asked, each of ``length`` tokens, or None: more prompts than the corpus has domains (one
    prompt each), or a domain whose split gives no token (a small file without line breaks puts everything in the
    training split: ``real.corpus.split_bytes`` cuts at a line start)."""
    if max(prompts, train) > len(domains):
        option = "--prompts" if prompts >= train else "--train-prompts"
        return (f"{option} {max(prompts, train)}: the corpus has {len(domains)} domains ({', '.join(sorted(domains))}), "
                f"one prompt from each; use {option} {len(domains)} or fewer")
    for name, count, split in (("held-out", prompts, held_out_prompts), ("training", train, train_prompts)):
        for domain, prompt in zip(sorted(domains), split(tok, domains, count, length)):
            if not prompt:
                return (f"the corpus's {domain} text has an empty {name} split, so its prompt would have no token; "
                        f"give a corpus whose files have text on both sides of the split (whole lines: the held-out "
                        f"part starts at a line break)")
            if len(prompt) < length:
                return (f"--prompt-len {length}: the corpus's {domain} {name} text gives {len(prompt)} tokens, so its "
                        f"prompt would be shorter than asked; use --prompt-len {len(prompt)} or less")
    return None


def score_sequences(tok, domains, count: int, length: int) -> list[list[int]]:
    """Held-out text for accuracy: ``count`` windows of ``length`` tokens, later in each domain's held-out
    split than the prompts, one domain after another."""
    names = sorted(domains)
    return [tok(domains[names[i % len(names)]].held_out[0][8000:16000], verbose=False)["input_ids"][:length]
            for i in range(count)]


def decode_mask(trace: Trace, prompts: list[list[int]]) -> np.ndarray:
    """True for the steps of ``trace`` that generated a token (a request's steps after its prompt)."""
    mask = np.zeros(trace.num_tokens, dtype=bool)
    for r, prompt in enumerate(prompts):
        mask[int(trace.request_starts[r]) + len(prompt):int(trace.request_starts[r + 1])] = True
    return mask
