"""Reading and writing trace files (.npz, never pickles), validated once at this boundary."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from traces.model_shape import ModelShape
from traces.trace import SCHEMA_VERSION, Trace, TraceMeta

_PRED = "pred."
_TIME = "time."
_ARRAYS = {
    "__meta__",
    "experts",
    "weights",
    "request_starts",
    "router_probs",
    "hidden_states",
    "hidden_token_index",
    "text_bytes",
    "text_offsets",
}
_META_KEYS = ("schema_version", "model", "source", "licence", "recorded_on", "description")
_REEXPORT = "re-export it with traces.io.save_trace (or re-run the importer that made it)"


class TraceError(ValueError):
    """A trace file or trace that breaks the schema; the message names the file, the field and the fix."""


def _fail(where, field: str, problem: str, fix: str):
    raise TraceError(f"{where}: {field}: {problem}: {fix}")


def save_trace(trace: Trace, path, compress: bool = True) -> None:
    """Validate, then write atomically: a temp file in the same directory, fsync, os.replace."""
    path = Path(path)
    validate_trace(trace, where=path)
    arrays = _stored_arrays(trace)
    writer = np.savez_compressed if compress else np.savez
    atomic_write(path, lambda f: writer(f, **arrays), binary=True)


def _stored_arrays(trace: Trace) -> dict[str, np.ndarray]:
    """The arrays a trace file holds, by member name."""
    id_dtype = np.uint8 if trace.num_experts <= 256 else np.uint16
    arrays = {
        "__meta__": np.frombuffer(json.dumps(trace.meta.to_dict()).encode("utf-8"), dtype=np.uint8),
        "experts": trace.experts.astype(id_dtype, copy=False),
        "weights": trace.weights,
        "request_starts": trace.request_starts.astype(np.int64, copy=False),
    }
    optional = {
        "router_probs": trace.router_probs,
        "hidden_states": trace.hidden_states,
        "hidden_token_index": trace.hidden_token_index,
        "text_bytes": trace.text_bytes,
        "text_offsets": trace.text_offsets,
    }
    arrays.update({k: v for k, v in optional.items() if v is not None})
    arrays.update({_PRED + k: v for k, v in trace.predictions.items()})
    arrays.update({_TIME + k: v for k, v in trace.timings.items()})
    return arrays


def _file_mode() -> int:
    # The umask can only be read by setting it; this runs once, at import, before any thread starts.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def output_problem(path, kind: str = "folder") -> str | None:
    """Why a command could not write its output at ``path``, found before any work starts and without creating
    anything; None when it can. ``kind``: ``folder`` (a results folder, created if missing) or ``file``. The
    message (``--out`` goes before it) names the path in the way and the fix: a file where a folder must be (or
    a folder where the file must be), or a nearest existing folder in which nothing can be created (a read-only
    or special file system, no permission), found by creating and removing an empty folder there."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        return "is a folder; give a file name (one in that folder, say)"
    start = path if kind == "folder" else path.parent
    existing = next((p for p in (start, *start.parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"{existing} is a file, not a folder; give a folder (a new one is created), or move the file away"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=existing))
    except OSError as e:
        return f"nothing can be created in {existing} ({e.strerror or e}); give a folder you can write to"
    return None


def atomic_write(path, write, binary: bool = False) -> None:
    """``write(f)`` into a temp file beside ``path``, fsync, then rename over ``path``: a reader
    never sees half a file, and a crash leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; the result should read like any file the user writes.
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a signal may land after the rename, when tmp is gone: the interrupt, not a FileNotFoundError, goes on
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_trace(path) -> Trace:
    path = Path(path)
    if not path.is_file():
        _fail(path, "file", "no such trace file", "check the path (traces.DEFAULT_TRACE is the committed sample)")
    trace = _assemble(_read_arrays(path), path)
    validate_trace(trace, where=path)
    return trace


_MAPPED_NAMES = "arrays.json"   # the member names of a mapped trace, written last: the folder is complete


def write_mapped(trace: Trace, folder) -> None:
    """The trace's arrays as uncompressed ``.npy`` files in ``folder``, for ``load_mapped``: processes
    that map one folder share its pages (the operating system's page cache) instead of each holding a
    copy of the decompressed trace. Written into a temporary folder that is renamed into place, so a
    reader never sees half of one; a folder that exists already is left as it is (same content: name
    the folder by the trace file's digest)."""
    folder = Path(folder)
    if (folder / _MAPPED_NAMES).is_file():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        arrays = _stored_arrays(trace)
        for name, values in arrays.items():
            np.save(tmp / f"{name}.npy", values, allow_pickle=False)
        (tmp / _MAPPED_NAMES).write_text(json.dumps(sorted(arrays)))
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / _MAPPED_NAMES).is_file():    # not a concurrent writer of the same folder: a real error
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_mapped(folder) -> Trace:
    """A trace that ``write_mapped`` wrote, its arrays memory-mapped read-only. Not validated again: it
    was validated where it entered (``load_trace``) before it was written."""
    folder = Path(folder)
    arrays = {}
    for name in json.loads((folder / _MAPPED_NAMES).read_text()):
        file = folder / f"{name}.npy"
        try:
            arrays[name] = np.asarray(np.load(file, mmap_mode="r", allow_pickle=False))
        except ValueError:          # an empty array cannot be mapped
            arrays[name] = np.load(file, allow_pickle=False)
    return _assemble(arrays, folder)


def _assemble(arrays: dict[str, np.ndarray], path: Path) -> Trace:
    """A ``Trace`` of a file's arrays, checking which arrays are there (not yet their content)."""
    if "__meta__" not in arrays:
        _fail(path, "__meta__", "missing", f"this is not a trace file; {_REEXPORT}")
    meta = _parse_meta(arrays["__meta__"], path)
    unknown = sorted(k for k in arrays if k not in _ARRAYS and not k.startswith((_PRED, _TIME)))
    if unknown:
        _fail(path, ", ".join(unknown), "unknown array(s)", "prediction tracks are named 'pred.<name>', timings 'time.<name>'")
    for name in ("experts", "weights", "request_starts"):
        if name not in arrays:
            _fail(path, name, "required array missing", _REEXPORT)
    return Trace(
        meta=meta,
        experts=arrays["experts"],
        weights=arrays["weights"],
        request_starts=arrays["request_starts"],
        router_probs=arrays.get("router_probs"),
        hidden_states=arrays.get("hidden_states"),
        hidden_token_index=arrays.get("hidden_token_index"),
        predictions={k[len(_PRED) :]: v for k, v in arrays.items() if k.startswith(_PRED)},
        timings={k[len(_TIME) :]: v for k, v in arrays.items() if k.startswith(_TIME)},
        text_bytes=arrays.get("text_bytes"),
        text_offsets=arrays.get("text_offsets"),
    )


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")   # a zip's first entry, or an empty zip
_NPY_MAGIC = b"\x93NUMPY"
_WHAT_A_TRACE_IS = ("a trace is an .npz (zip) of numeric arrays __meta__, experts, weights and "
                    "request_starts, written by traces.io.save_trace or an importer")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if not head:
        _fail(path, "file", "the file is empty (truncated or corrupt)", _REEXPORT)
    if head.startswith(_NPY_MAGIC):
        _fail(path, "file", "this is a single .npy array, not an .npz trace file", _WHAT_A_TRACE_IS)
    if not head.startswith(_ZIP_MAGIC):
        # np.load would call any non-zip file a pickle; name what the file is not, and what a trace is.
        _fail(path, "file", "not an .npz trace file (no zip header)", _WHAT_A_TRACE_IS)
    arrays, member = {}, "file"
    try:
        with np.load(path, allow_pickle=False) as npz:
            for member in npz.files:
                arrays[member] = npz[member]
    except ValueError as e:
        if "allow_pickle" in str(e):
            _fail(path, member, "an object array (pickled Python objects), which traces never load",
                  "store numeric arrays only")
        _fail(path, "file", f"file is truncated or corrupt ({type(e).__name__}: {e})", _REEXPORT)
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, KeyError) as e:
        # np.load raises any of these for truncated or bit-flipped zips.
        _fail(path, "file", f"file is truncated or corrupt ({type(e).__name__}: {e})", _REEXPORT)
    return arrays


def _parse_meta(raw: np.ndarray, path: Path) -> TraceMeta:
    if raw.dtype != np.uint8 or raw.ndim != 1:
        _fail(path, "__meta__", f"must be a 1-D uint8 array of UTF-8 JSON, got {raw.dtype} {raw.shape}", _REEXPORT)
    try:
        d = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(path, "__meta__", f"not valid UTF-8 JSON ({e})", _REEXPORT)
    if not isinstance(d, dict):
        _fail(path, "__meta__", "must be a JSON object", _REEXPORT)
    version = d.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        _fail(path, "__meta__.schema_version", f"missing or not an integer ({version!r})", _REEXPORT)
    if version > SCHEMA_VERSION:
        _fail(path, "__meta__.schema_version", f"{version} is newer than this code's {SCHEMA_VERSION}",
              "upgrade moe-offload-lab")
    if version < SCHEMA_VERSION:
        _fail(path, "__meta__.schema_version", f"{version} is older than this code's {SCHEMA_VERSION}",
              "re-import the trace from its source")
    missing = [k for k in _META_KEYS if k not in d]
    if missing:
        _fail(path, "__meta__", f"missing key(s) {missing}", _REEXPORT)
    for k in _META_KEYS[2:]:
        if not isinstance(d[k], str):
            _fail(path, f"__meta__.{k}", f"must be a string, got {d[k]!r}", _REEXPORT)
    extra = d.get("extra", {})
    if not isinstance(extra, dict):
        _fail(path, "__meta__.extra", f"must be a JSON object, got {type(extra).__name__}", _REEXPORT)
    try:
        model = ModelShape.from_dict(d["model"], source=f"{path}: __meta__.model")
    except ValueError as e:
        raise TraceError(str(e)) from None
    return TraceMeta(
        schema_version=version,
        model=model,
        source=d["source"],
        licence=d["licence"],
        recorded_on=d["recorded_on"],
        description=d["description"],
        extra=extra,
    )


def validate_trace(trace: Trace, where) -> None:
    """Check every schema rule with whole-array numpy operations; raise TraceError naming the field."""
    model = trace.meta.model
    L, K, E = model.num_layers, model.top_k, model.num_experts
    experts = trace.experts
    if experts.ndim != 3 or experts.shape[1:] != (L, K):
        _fail(where, "experts", f"shape {experts.shape}, expected [T, {L}, {K}] (num_layers, top_k of {model.name})",
              "fix __meta__.model or the array")
    if not np.issubdtype(experts.dtype, np.integer):
        _fail(where, "experts", f"dtype {experts.dtype} is not an integer type", "store expert ids as uint8/uint16")
    T = experts.shape[0]
    _check_expert_ids(experts, E, where)
    _check_float(trace.weights, "weights", (T, L, K), where, probabilities=True)

    starts = trace.request_starts
    if starts.ndim != 1 or len(starts) < 2 or not np.issubdtype(starts.dtype, np.integer):
        _fail(where, "request_starts", f"must be a 1-D integer array [R+1] with R >= 1, got {starts.dtype} {starts.shape}",
              "store one start index per request plus the total token count")
    if starts[0] != 0 or starts[-1] != T:
        _fail(where, "request_starts", f"must start at 0 and end at T={T}, got {starts[0]}..{starts[-1]}",
              "rebuild it from the request boundaries")
    step = _signed_diff(starts)
    if not (step > 0).all():
        bad = int(np.argmax(step <= 0))
        _fail(where, "request_starts", f"not strictly increasing at request {bad} ({starts[bad]} -> {starts[bad + 1]})",
              "drop empty requests and sort the boundaries")

    if trace.router_probs is not None:
        _check_float(trace.router_probs, "router_probs", (T, L, E), where, probabilities=True)
    if (trace.hidden_states is None) != (trace.hidden_token_index is None):
        _fail(where, "hidden_states", "hidden_states and hidden_token_index must come together", "store both or neither")
    if trace.hidden_states is not None:
        index = trace.hidden_token_index
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            _fail(where, "hidden_token_index", f"must be a 1-D integer array, got {index.dtype} {index.shape}", _REEXPORT)
        if len(index) and (index[0] < 0 or index[-1] >= T or not (_signed_diff(index) > 0).all()):
            _fail(where, "hidden_token_index", f"must be strictly increasing token indices in [0, {T})",
                  "sort the recorded tokens and drop duplicates")
        _check_float(trace.hidden_states, "hidden_states", (len(index), L, model.hidden_size), where)
    for name, scores in trace.predictions.items():
        if scores.ndim != 4 or scores.shape[2] < 1:
            _fail(where, _PRED + name, f"shape {scores.shape}, expected [T, L, D, E] with D >= 1",
                  "store scores for layers l+1..l+D")
        _check_float(scores, _PRED + name, (T, L, scores.shape[2], E), where)
    for name, values in trace.timings.items():
        if values.ndim < 1 or values.shape[0] != T or not (
            np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
        ):
            _fail(where, _TIME + name, f"must be numeric with first dimension T={T}, got {values.dtype} {values.shape}",
                  "store one row per token")
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            _fail(where, _TIME + name, "contains NaN or inf", "drop or re-measure the bad tokens")
    _check_text(trace, T, where)


def _check_expert_ids(experts: np.ndarray, num_experts: int, where) -> None:
    if experts.size == 0:
        return
    lo, hi = experts.min(), experts.max()
    if lo < 0 or hi >= num_experts:
        flat = int(np.argmax((experts < 0) | (experts >= num_experts)))
        t, layer, _ = np.unravel_index(flat, experts.shape)
        _fail(where, "experts", f"id out of range [0, {num_experts}) first at token {t}, layer {layer} "
              f"(min {lo}, max {hi}, num_experts {num_experts})", "fix __meta__.model.num_experts or the ids")
    # k(k-1)/2 column comparisons: for top-k <= 8 this is ~10x faster than sorting every row.
    top_k = experts.shape[-1]
    dup = np.zeros(experts.shape[:-1], dtype=bool)
    for i in range(top_k):
        for j in range(i + 1, top_k):
            dup |= experts[..., i] == experts[..., j]
    if dup.any():
        t, layer = np.unravel_index(int(np.argmax(dup)), dup.shape)
        _fail(where, "experts", f"duplicate expert id within token {t}, layer {layer}: {experts[t, layer].tolist()}",
              "the top-k ids of one (token, layer) must be distinct")


def _signed_diff(values: np.ndarray) -> np.ndarray:
    """Steps between neighbours; unsigned arrays would wrap a decrease into a huge positive step."""
    return np.diff(values.astype(np.int64, copy=False))


def _check_float(values: np.ndarray, field: str, shape: tuple, where, probabilities: bool = False) -> None:
    if values.shape != shape:
        _fail(where, field, f"shape {values.shape}, expected {list(shape)}", "fix __meta__.model or the array")
    if not np.issubdtype(values.dtype, np.floating):
        _fail(where, field, f"dtype {values.dtype} is not a float type", "store float16 or float32")
    if not np.isfinite(values).all():
        bad = np.unravel_index(int(np.argmax(~np.isfinite(values))), values.shape)
        _fail(where, field, f"contains NaN or inf, first at index {tuple(int(i) for i in bad)}",
              "fix the recording or drop the affected requests")
    if probabilities and values.size and values.min() < 0:
        bad = np.unravel_index(int(np.argmax(values < 0)), values.shape)
        _fail(where, field, f"negative value {values[bad]} at index {tuple(int(i) for i in bad)}",
              "store the router's probabilities (softmax outputs, >= 0), not its logits")


def _check_text(trace: Trace, T: int, where) -> None:
    if (trace.text_bytes is None) != (trace.text_offsets is None):
        _fail(where, "text_bytes", "text_bytes and text_offsets must come together", "store both or neither")
    if trace.text_bytes is None:
        return
    text, offsets = trace.text_bytes, trace.text_offsets
    if text.dtype != np.uint8 or text.ndim != 1:
        _fail(where, "text_bytes", f"must be 1-D uint8, got {text.dtype} {text.shape}", "store UTF-8 bytes")
    if offsets.shape != (T + 1,) or not np.issubdtype(offsets.dtype, np.integer):
        _fail(where, "text_offsets", f"must be [T+1]={T + 1} integers, got {offsets.dtype} {offsets.shape}", _REEXPORT)
    if offsets[0] != 0 or offsets[-1] != len(text) or (_signed_diff(offsets) < 0).any():
        _fail(where, "text_offsets", f"must rise from 0 to len(text_bytes)={len(text)} without decreasing", _REEXPORT)
