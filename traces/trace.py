"""The in-memory trace: router decisions per decode step and MoE layer, plus optional side tracks.

Arrays are trusted here: `traces.io` validates them once where they enter (load) or leave (save).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from traces.model_shape import ModelShape

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TraceMeta:
    schema_version: int
    model: ModelShape
    source: str  # where the routing came from (repository, commit, file)
    licence: str
    recorded_on: str  # device / machine, or "n/a" for synthetic traces
    description: str
    extra: dict = field(default_factory=dict)  # JSON-serialisable, free-form

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "model": self.model.to_dict(),
            "source": self.source,
            "licence": self.licence,
            "recorded_on": self.recorded_on,
            "description": self.description,
            "extra": self.extra,
        }


@dataclass(frozen=True, eq=False)
class Trace:
    meta: TraceMeta
    experts: np.ndarray  # [T, L, K] int, chosen expert ids in router order
    weights: np.ndarray  # [T, L, K] float, router weights of the chosen experts
    request_starts: np.ndarray  # [R+1] int64, token index where each request starts; last is T
    router_probs: np.ndarray | None = None  # [T, L, E]
    hidden_states: np.ndarray | None = None  # [N, L, H], hidden state entering each MoE layer
    hidden_token_index: np.ndarray | None = None  # [N] int64, strictly increasing token indices
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [T, L, D, E]
    timings: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [T, ...]
    text_bytes: np.ndarray | None = None  # [N] uint8, UTF-8 text of all tokens
    text_offsets: np.ndarray | None = None  # [T+1] int64

    @property
    def model(self) -> ModelShape:
        return self.meta.model

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def num_experts(self) -> int:
        return self.meta.model.num_experts

    @property
    def num_requests(self) -> int:
        return len(self.request_starts) - 1

    def select_requests(self, start: int, stop: int) -> Trace:
        """Requests [start, stop) as a trace of their own, token indices rebased to 0."""
        if not 0 <= start < stop <= self.num_requests:
            raise ValueError(
                f"select_requests({start}, {stop}): need 0 <= start < stop <= num_requests ({self.num_requests})"
            )
        t0, t1 = int(self.request_starts[start]), int(self.request_starts[stop])
        hidden_states = hidden_token_index = None
        if self.hidden_states is not None:
            keep = (self.hidden_token_index >= t0) & (self.hidden_token_index < t1)
            hidden_states = self.hidden_states[keep]
            hidden_token_index = self.hidden_token_index[keep] - t0
        text_bytes = text_offsets = None
        if self.text_offsets is not None:
            b0, b1 = int(self.text_offsets[t0]), int(self.text_offsets[t1])
            text_bytes = self.text_bytes[b0:b1]
            text_offsets = self.text_offsets[t0 : t1 + 1] - b0
        return dataclasses.replace(
            self,
            experts=self.experts[t0:t1],
            weights=self.weights[t0:t1],
            request_starts=self.request_starts[start : stop + 1] - t0,
            router_probs=None if self.router_probs is None else self.router_probs[t0:t1],
            hidden_states=hidden_states,
            hidden_token_index=hidden_token_index,
            predictions={k: v[t0:t1] for k, v in self.predictions.items()},
            timings={k: v[t0:t1] for k, v in self.timings.items()},
            text_bytes=text_bytes,
            text_offsets=text_offsets,
        )

    def split(self, train_fraction: float) -> tuple[Trace | None, Trace | None]:
        """Split by whole requests: the first ceil(fraction * R) requests, then the rest.

        For 0 < fraction < 1 both parts hold at least one request (so R >= 2 is required);
        fraction 0 gives (None, self) and fraction 1 gives (self, None), since a trace is never empty.
        """
        if not 0.0 <= train_fraction <= 1.0:
            raise ValueError(f"split: train_fraction must be in [0, 1], got {train_fraction}")
        if train_fraction == 0.0:
            return None, self
        if train_fraction == 1.0:
            return self, None
        num_requests = self.num_requests
        if num_requests < 2:
            raise ValueError(
                f"split({train_fraction}): the trace has {num_requests} request(s); splitting needs at least 2: "
                f"use train_fraction=0 (no training slice; policies that learn from one, such as static and "
                f"affinity, need it) or a trace of more requests"
            )
        first = min(max(math.ceil(train_fraction * num_requests), 1), num_requests - 1)
        return self.select_requests(0, first), self.select_requests(first, num_requests)

    def head_tokens(self, n: int) -> Trace:
        """The leading whole requests that hold at least n tokens (all of them if the trace is shorter)."""
        if n <= 0:
            raise ValueError(f"head_tokens: n must be positive, got {n}")
        stop = int(np.searchsorted(self.request_starts, n, side="left"))
        return self.select_requests(0, min(stop, self.num_requests))

    def first_tokens(self, n: int) -> Trace:
        """The first ``n`` tokens (all if fewer), the request in progress at ``n`` cut there: the steps an
        engine run that stops after ``n`` tokens decoded (``OffloadEngine.replay(trace, n)``)."""
        if n <= 0:
            raise ValueError(f"first_tokens: n must be positive, got {n}")
        if n >= self.num_tokens:
            return self
        starts = self.request_starts[self.request_starts < n]
        cut = self.select_requests(0, len(starts))
        hidden_states, hidden_token_index = cut.hidden_states, cut.hidden_token_index
        if hidden_states is not None:
            keep = hidden_token_index < n
            hidden_states, hidden_token_index = hidden_states[keep], hidden_token_index[keep]
        return dataclasses.replace(
            cut,
            experts=cut.experts[:n],
            weights=cut.weights[:n],
            request_starts=np.append(starts, n).astype(np.int64),
            router_probs=None if cut.router_probs is None else cut.router_probs[:n],
            hidden_states=hidden_states,
            hidden_token_index=hidden_token_index,
            predictions={k: v[:n] for k, v in cut.predictions.items()},
            timings={k: v[:n] for k, v in cut.timings.items()},
            text_bytes=None if cut.text_offsets is None else cut.text_bytes[: int(cut.text_offsets[n])],
            text_offsets=None if cut.text_offsets is None else cut.text_offsets[: n + 1],
        )

    def repeat(self, times: int) -> Trace:
        """The requests ``times`` over, one after another (a decode run again on the same engine, whose
        future the bounds read): routing, weights and prediction tracks tiled; hidden states, text and
        timings, which belong to one recording, left out."""
        if times < 1:
            raise ValueError(f"repeat: times must be >= 1, got {times}")
        T = self.num_tokens
        starts = np.concatenate([self.request_starts[:-1] + i * T for i in range(times)] + [[times * T]])
        tile = lambda a: None if a is None else np.concatenate([a] * times)      # noqa: E731
        return dataclasses.replace(
            self, experts=tile(self.experts), weights=tile(self.weights), request_starts=starts.astype(np.int64),
            router_probs=tile(self.router_probs), hidden_states=None, hidden_token_index=None,
            predictions={k: tile(v) for k, v in self.predictions.items()}, timings={}, text_bytes=None,
            text_offsets=None)

    def for_shape(self, shape: ModelShape) -> Trace:
        """This routing replayed on ``shape``: the first ``shape.num_layers`` layers, the meta's model
        replaced (e.g. a trained model's routing at a production model's expert size); hidden states go
        when the hidden size differs (they are another model's). Raises ValueError
        when ``shape`` has other experts per layer or top-k, or more layers than the trace."""
        if (shape.num_experts, shape.top_k) != (self.num_experts, self.top_k) or shape.num_layers > self.num_layers:
            raise ValueError(f"a trace of {self.model.name} ({self.num_layers} layers, top-{self.top_k} of "
                             f"{self.num_experts}) cannot route {shape.name} ({shape.num_layers} layers, "
                             f"top-{shape.top_k} of {shape.num_experts})")
        L = shape.num_layers
        keep_hidden = self.hidden_states is not None and shape.hidden_size == self.model.hidden_size
        return dataclasses.replace(
            self,
            meta=dataclasses.replace(self.meta, model=shape),
            experts=self.experts[:, :L],
            weights=self.weights[:, :L],
            router_probs=None if self.router_probs is None else self.router_probs[:, :L],
            hidden_states=self.hidden_states[:, :L] if keep_hidden else None,
            hidden_token_index=self.hidden_token_index if keep_hidden else None,
            predictions={k: v[:, :L] for k, v in self.predictions.items()},
            timings={k: v[:, :L] if v.ndim > 1 and v.shape[1] == self.num_layers else v
                     for k, v in self.timings.items()},
        )

    def token_text(self, t: int) -> str | None:
        if self.text_offsets is None:
            return None
        raw = self.text_bytes[self.text_offsets[t] : self.text_offsets[t + 1]].tobytes()
        # A token can end inside a multi-byte UTF-8 character, so decode leniently.
        return raw.decode("utf-8", errors="replace")
