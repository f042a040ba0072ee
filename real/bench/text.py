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


def held_out_prompts(tok, domains, count: int, length: int) -> list[list[int]]:
    """The start of the held-out text of ``count`` corpus domains (sorted by name), ``length`` tokens each."""
    return [tok(domains[d].held_out[0][:4000])["input_ids"][:length] for d in sorted(domains)[:count]]


def train_prompts(tok, domains, count: int, length: int) -> list[list[int]]:
    """The same from the training split: text the measured prompts never share, so a policy that learns
    from its decode (``static``, ``affinity``) is measured on routing it did not see."""
    return [tok(domains[d].train[0][:4000])["input_ids"][:length] for d in sorted(domains)[:count]]


def score_sequences(tok, domains, count: int, length: int) -> list[list[int]]:
    """Held-out text for accuracy: ``count`` windows of ``length`` tokens, later in each domain's held-out
    split than the prompts, one domain after another."""
    names = sorted(domains)
    return [tok(domains[names[i % len(names)]].held_out[0][8000:16000])["input_ids"][:length] for i in range(count)]


def decode_mask(trace: Trace, prompts: list[list[int]]) -> np.ndarray:
    """True for the steps of ``trace`` that generated a token (a request's steps after its prompt)."""
    mask = np.zeros(trace.num_tokens, dtype=bool)
    for r, prompt in enumerate(prompts):
        mask[int(trace.request_starts[r]) + len(prompt):int(trace.request_starts[r + 1])] = True
    return mask
