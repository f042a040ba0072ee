"""Hidden states for training predictors, captured in bulk from a checkpoint's training text.

A lookahead gate learns from the post-attention residual h_l entering each MoE layer (the quantity
the engine records, ``OffloadEngine(record_hidden_steps=N)``), but a token-by-token engine run gives a
few thousand tokens a minute. Here Hugging Face's batched forward runs whole windows of the corpus's
*training* split, and a forward pre-hook on each decoder layer's ``post_attention_layernorm`` (the
MoE norm: Mixtral, Qwen2/3-MoE and OLMoE all name it so) keeps its input, which is exactly h_l.
Held-out text stays untouched, so predictors are scored on text they never saw.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from real.corpus import DEFAULT_CORPUS_DIR

MOE_NORM = "post_attention_layernorm"
CAPTURE_WINDOW = 256    # tokens per captured sequence: rows t and t+1 are consecutive unless t+1 starts one


@torch.no_grad()
def capture_hidden_states(model_dir: str | Path, tokens: int, corpus: str | Path = DEFAULT_CORPUS_DIR,
                          window: int = CAPTURE_WINDOW, batch: int = 16, device: str = "cpu",
                          dtype: torch.dtype = torch.float32, seed: int = 0, split: str = "train") -> np.ndarray:
    """h_l for ``tokens`` tokens of text: float16 [tokens, L, H]. Windows of ``window`` tokens are
    drawn at random (seeded) from every domain's ``split`` ("train", or "held_out" to score predictors
    teacher-forced on text nothing was trained on) in turn, so all domains count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from real.corpus import load_corpus
    if tokens < 1 or window < 2:
        raise ValueError(f"capture_hidden_states: tokens={tokens}, window={window}; need tokens >= 1, window >= 2")
    if split not in ("train", "held_out"):
        raise ValueError(f"capture_hidden_states: split={split!r}; use 'train' or 'held_out'")
    tok = AutoTokenizer.from_pretrained(model_dir)
    domains = load_corpus(corpus)
    rng = np.random.default_rng(seed)
    windows_needed = -(-tokens // window)
    per_domain = -(-windows_needed // len(domains))
    chars = window * 8                      # generous: the local BPE averages about 4 characters a token
    ids: list[list[int]] = []
    for name in sorted(domains):
        text = "\n".join(getattr(domains[name], split))
        if not text:
            continue
        starts = rng.integers(0, max(1, len(text) - chars), size=per_domain)
        for s in starts:
            piece = tok(text[int(s):int(s) + chars])["input_ids"][:window]
            if len(piece) == window:
                ids.append(piece)
    if not ids:
        raise ValueError(f"{corpus}: no {split} text of {window} tokens in any domain")
    ids = [ids[i] for i in rng.permutation(len(ids))][:windows_needed]

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    layers = hf.model.layers
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for index, layer in enumerate(layers):
        norm = getattr(layer, MOE_NORM, None)
        if norm is None:
            raise ValueError(f"{model_dir}: decoder layer {index} has no {MOE_NORM}; "
                             f"hidden-state capture knows Mixtral, Qwen2/3-MoE and OLMoE layouts")
        hooks.append(norm.register_forward_pre_hook(
            lambda _m, args, i=index: captured[i].append(args[0].reshape(-1, args[0].shape[-1]).to("cpu", torch.float16))))
    try:
        for start in range(0, len(ids), batch):
            hf(torch.tensor(ids[start:start + batch], device=device))
    finally:
        for h in hooks:
            h.remove()
    del hf
    hidden = torch.stack([torch.cat(c) for c in captured], dim=1)      # [N, L, H]
    return hidden[:tokens].numpy()
