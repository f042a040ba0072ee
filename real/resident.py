"""The fully-resident reference: the whole model on one device, decoded token by token through the
same per-layer calls (and, on CUDA, the same graphs) as the offloaded engine, so that a lossless
engine's tokens can be checked against it bit for bit. ``MoEModel.decode_step`` and
``MoEModel.generate_greedy`` are these functions.

``quiet_gc`` lives here because it belongs to decode loops, this one and the engine's alike.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from real.model import BlobOf, MoEModel


@dataclass(frozen=True)
class LayerRecord:
    """What one MoE layer saw in one step, left on the device (no synchronisation)."""
    expert_ids: torch.Tensor   # [K] int64, in torch.topk order
    weights: torch.Tensor      # [K] the weights applied to the expert outputs
    probs: torch.Tensor        # [E] float32: the full router softmax
    hidden: torch.Tensor       # [H] the MoE layer's input (after the post-attention norm)


@contextmanager
def quiet_gc():
    """Decode with the objects that exist now (model, tokenizer, corpus, the harness's tables) moved out
    of the garbage collector's reach, as serving engines do after start-up: otherwise a full collection,
    triggered by whatever the decode loop allocates, walks all of them in the middle of a token (our
    suspect for the single 10-260 ms steps of the H100 runs). Collections of new objects still run.
    Its own full collection can take a few hundred ms in a process that has loaded transformers: enter
    it before a timed region, not inside one."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def decode_step(model: "MoEModel", token_id: int, pos: int, blob_of: "BlobOf | None" = None,
                record: list[LayerRecord] | None = None) -> torch.Tensor:
    """Logits [1, V] after the token at ``pos``; appends one ``LayerRecord`` per layer to ``record``.
    ``blob_of(layer, expert)``: where each expert's weights come from (default: ``expert_blobs``).
    The model's decode protocol (``MoEModel.begin_token``, ``front``, ``run_expert``, ``back``), as the
    offloaded engine walks it."""
    model.begin_token(token_id, pos)
    E = model.config.num_experts
    graphs = model.resident_expert_graphs if blob_of is None else None
    if graphs is not None and graphs.layers is not model._graphs:
        graphs = None                                  # the layer graphs were recaptured since
    blob_of = blob_of or model.resident_blob
    for layer in range(model.config.num_layers):
        front = model.front(layer)
        if record is not None:      # copies: with graphs these are buffers the next replays overwrite
            record.append(LayerRecord(front.ids.reshape(-1).clone(), front.weights.reshape(-1).clone(),
                                      front.probs.reshape(-1).clone(), front.x.reshape(-1).clone()))
        for i, e in enumerate(model.read_routing(layer, front.ids, front.weights)[0]):
            if graphs is not None:
                graphs.expert(layer * E + e, i)
            else:
                model.run_expert(i, blob_of(layer, e))
    return model.back()


def generate_greedy(model: "MoEModel", prompt_ids: Sequence[int], max_new_tokens: int,
                    blob_of: "BlobOf | None" = None,
                    record: list[list[LayerRecord]] | None = None) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (a new request: the cache is reset); returns the
    ``max_new_tokens`` new tokens. The prompt runs token by token; ``record`` gets one list of
    ``LayerRecord`` per step (prompt steps included)."""
    if not prompt_ids:
        raise ValueError("generate_greedy needs at least one prompt token")
    if len(prompt_ids) + max_new_tokens - 1 > model.max_len:
        raise ValueError(f"{len(prompt_ids)} prompt + {max_new_tokens} new tokens exceed max_len="
                         f"{model.max_len}; build the model with a larger max_len")
    model.reset()

    def step(token: int, pos: int) -> torch.Tensor:
        layers = None if record is None else []
        logits = decode_step(model, token, pos, blob_of, layers)
        if record is not None:
            record.append(layers)
        return logits

    for pos, token in enumerate(prompt_ids):
        logits = step(int(token), pos)
    out: list[int] = []
    for i in range(max_new_tokens):
        out.append(int(logits.argmax(dim=-1)[0]))
        if i + 1 < max_new_tokens:
            logits = step(out[-1], len(prompt_ids) + i)
    return out
