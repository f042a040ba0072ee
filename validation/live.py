"""A live slice's inputs: the model (a checkpoint, or random weights of a shape), its held-out requests and
training requests, and the recorded decode with one prediction track per live predictor, so that the
simulator replays exactly what the engine's predictors say (``real.tracks``).

Prompts come from the corpus's held-out split (the measured run) and training split (the slice ``static``
and ``affinity`` learn from, in both clocks) through the checkpoint's tokenizer; without a corpus, from
random token ids (seeded), which is what the CPU smoke run uses.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from real.bench.predictor_suite import live_predictors
from real.bench.recording import record_run
from real.bench.text import decode_mask, held_out_prompts, load_text, train_prompts
from real.checkpoint import load_checkpoint
from real.lookahead_gate import LookaheadGate
from real.model import MoEModel
from real.predictors import default_vectors
from real.shape_model import random_model
from real.tracks import compute_tracks
from traces.digest import digest_files
from validation.engine_side import SliceInputs
from validation.scenario import Slice


def _random_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab, size=(count, length)).tolist()


def live_inputs(sl: Slice, device: torch.device, dtype: torch.dtype) -> tuple[MoEModel, SliceInputs]:
    """(the model with its experts on the host, the slice's inputs). The checkpoint, corpus and gate were checked
    before the call measured anything (``validation.preflight``)."""
    max_len = sl.prompt_len + sl.new_tokens + 1
    if sl.model == "random":
        shape = sl.model_shape()
        model = random_model(shape, device, dtype, max_len=max(max_len, 64))
        model_id = f"random-weights:{shape.name}:seed0"
    else:
        path = Path(sl.model)
        config, tensors = load_checkpoint(path, dtype)
        shape = config.to_model_shape(path.name)
        model = MoEModel(config, tensors, device=device, dtype=dtype, experts_device="cpu")
        del tensors
        model_id = digest_files(sorted(path.glob("*.safetensors")) + [path / "config.json"])
    if sl.corpus and sl.model != "random":
        tok, domains = load_text(Path(sl.model), Path(sl.corpus))
        prompts = held_out_prompts(tok, domains, sl.prompts, sl.prompt_len)
        train_text = train_prompts(tok, domains, sl.train_prompts, sl.prompt_len)
    else:
        prompts = _random_prompts(shape.vocab_size, sl.prompts, sl.prompt_len, seed=1)
        train_text = _random_prompts(shape.vocab_size, sl.train_prompts, sl.prompt_len, seed=2)
    recorded, _ = record_run(model, shape, prompts, sl.new_tokens, source=f"validation.live, slice {sl.name}",
                             description="greedy decode of the slice's held-out prompts, all experts resident")
    train, _ = record_run(model, shape, train_text, sl.new_tokens, source=f"validation.live, slice {sl.name}",
                          description="greedy decode of the slice's training prompts: what static and affinity "
                                      "learn from, and the default vectors")
    # Live predictors and their tracks of the recorded decode: the pre-gates need no training; the
    # lookahead gate is a trained one given by the slice (experiments.train_gate), else absent.
    vectors = default_vectors(model, train.hidden_states)
    gate = LookaheadGate.load(sl.gate, model, device) if sl.gate else None
    at = live_predictors(model, vectors, gate, sl.prefetch_depth)
    timed, _ = compute_tracks(recorded, at(sl.prefetch_depth), sl.prefetch_depth, f"{sl.name}: recorded decode")
    inputs = SliceInputs(shape, timed, train, model_id, decode_mask(recorded, prompts), prompts=prompts,
                         new_tokens=sl.new_tokens, train_prompts=train_text, predictors_at=at,
                         gate_digest=digest_files(sorted(Path(sl.gate).glob("*"))) if sl.gate else None)
    return model, inputs
