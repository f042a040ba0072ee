"""Trace format (schema, validated loader, atomic writer), importers, samples and model shapes."""

from pathlib import Path

from traces.io import TraceError, load_trace, save_trace
from traces.model_shape import ModelShape, available_shapes, load_shape
from traces.synthetic import synthetic_trace
from traces.trace import SCHEMA_VERSION, Trace, TraceMeta

DEFAULT_TRACE = Path(__file__).resolve().parent / "samples" / "gpt-oss-20b-sample.npz"

__all__ = [
    "DEFAULT_TRACE",
    "SCHEMA_VERSION",
    "ModelShape",
    "Trace",
    "TraceError",
    "TraceMeta",
    "available_shapes",
    "load_shape",
    "load_trace",
    "save_trace",
    "synthetic_trace",
]
