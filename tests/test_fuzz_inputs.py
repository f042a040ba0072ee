"""Generated inputs at the two boundaries: the sweep's key=value tokens and YAML scenarios, and trace
files. Either the input is valid and works, or the project's own error class says, in one line, what
is wrong and how to fix it (through the CLI: exit code 2) — never a bare library exception."""
import contextlib
import os
import dataclasses
import io
import json

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from experiments.config import SWEEP_KEYS, ConfigError
from experiments.overrides import DEFAULT_SCENARIO, build_spec
from experiments.runner import run_config, validate_grid
from experiments.sweep import main
from hardware.profile import HardwareProfileError
from policies.registry import PolicyLoadError
from traces import Trace, TraceError, load_trace, save_trace, synthetic_trace

PROJECT_ERRORS = (ConfigError, TraceError, HardwareProfileError, PolicyLoadError)
# 200 cases each, a few seconds; FUZZ_EXAMPLES=5000 for a longer hunt.
FAST = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 200)), deadline=None, suppress_health_check=list(HealthCheck))

# Module-level files (hypothesis reuses them across examples): a tiny valid trace, a file that is
# not a trace, a hardware profile that is not valid YAML, and a user policy.
_DIR = None


@pytest.fixture(scope="module", autouse=True)
def files(tmp_path_factory):
    global _DIR
    _DIR = tmp_path_factory.mktemp("fuzz")
    save_trace(synthetic_trace(num_tokens=48, num_layers=2, num_experts=6, top_k=2, num_requests=4, seed=1),
               _DIR / "tiny.npz")
    (_DIR / "notes.npz").write_text("not a trace")
    (_DIR / "bad.yaml").write_text("name: [unclosed\n")
    (_DIR / "mine.py").write_text("from policies.lru import LRU\n\n\nclass Mine(LRU):\n"
                                  "    parameters = {'alpha': 'unused'}\n")
    return _DIR


def _value_texts(key: str):
    ints = st.one_of(st.integers(-2, 8).map(str),
                     st.tuples(st.integers(-1, 7), st.integers(-1, 7)).map(lambda ab: f"{ab[0]}..{ab[1]}"),
                     st.tuples(st.integers(-1, 6), st.integers(-1, 8), st.integers(-1, 2))
                     .map(lambda t: f"range({t[0]},{t[1]},{t[2]})"))
    floats = st.sampled_from(["0", "0.25", "0.5", "0.99", "1", "1e9", "nan", "inf", "-0.0", "-3", "12.5"])
    odd = st.sampled_from(["null", "true", ",", "a,,b", "[1, 2]", "{a: 1}", "é", "range(", "1..", "~", "x"])
    by_key = {
        "policy": st.sampled_from(["lru", "fifo", "belady", "oracle", "lfu", "static", "nope", "x.py:C", "os:path",
                                   "policies.lru:Nope", "policies.lru:LRU", "{dir}/mine.py:Mine", "lru,belady",
                                   "{dir}/missing.py:Mine"]),
        "trace": st.sampled_from(["{dir}/tiny.npz"] * 4 + ["{dir}/notes.npz", "{dir}/missing.npz", "{dir}"]),
        "hardware": st.sampled_from(["h100-pcie5", "a100-pcie4", "tpu-v9", "{dir}/bad.yaml", "{dir}/none.yaml"]),
        "precision": st.sampled_from(["bf16", "fp8", "mxfp4", "int2", "fp7", "BF16"]),
        "cache_mode": st.sampled_from(["per_layer", "global", "Global", "both"]),
        "cache_slots": ints, "copy_engines": ints, "prefetch_depth": ints, "max_tokens": ints, "prompt_tokens": ints,
        "pcie_GBps": floats, "copy_latency_us": floats, "train_fraction": floats,
        "policy.alpha": st.one_of(floats, ints, odd), "policy.min_score": floats, "policy.sed": ints,
    }
    typed = by_key.get(key, st.one_of(ints, floats, odd))
    return st.one_of(typed, typed, typed, typed, typed, odd)


GOOD_KEYS = [*SWEEP_KEYS, "policy.alpha", "policy.min_score"]
BAD_KEYS = ["policy.sed", "cache_slot", "policy.", "CACHE_SLOTS", " cache_slots", "trace.x"]
KEYS = st.one_of(st.sampled_from(GOOD_KEYS), st.sampled_from(GOOD_KEYS), st.sampled_from(GOOD_KEYS),
                 st.sampled_from(BAD_KEYS))


@st.composite
def tokens(draw):
    keys = draw(st.lists(KEYS, max_size=4, unique=True))
    out = [] if "trace" in keys else [f"trace={_DIR}/tiny.npz"]
    for key in keys:
        text = draw(_value_texts(key.strip())).replace("{dir}", str(_DIR))
        form = draw(st.sampled_from(["{k}={v}"] * 12 + ["{k}{v}", "{k}=={v}", "{k}="]))
        out.append(form.format(k=key, v=text))
    return out


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 9), st.floats(allow_nan=True, width=32),
                     st.sampled_from(["lru", "belady", "4..6", "range(2,5)", "h100-pcie5", "fp8", "global", "x"]))


@st.composite
def scenario_text(draw):
    if draw(st.integers(0, 5)) == 0:    # not a mapping, or not YAML at all
        return draw(st.sampled_from(["- 1\n- 2\n", "a: [\n", ":::\n", "\t- x\n", "42\n", "", "policy: {a: 1}\n"]))
    mapping = {}
    for key in draw(st.lists(KEYS, max_size=4, unique=True)):
        value = draw(st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3), st.lists(st.lists(_SCALARS), max_size=1)))
        mapping[key] = value
    return yaml.safe_dump(mapping)


def _given_keys(argv: list[str], text: str) -> set[str]:
    keys = {t.partition("=")[0].strip() for t in argv}
    with contextlib.suppress(Exception):
        data = yaml.safe_load(text)
        if isinstance(data, dict):
            keys |= {str(k) for k in data}
    return keys


@FAST
@given(argv=tokens(), text=st.one_of(st.none(), st.none(), scenario_text()))
def test_sweep_input_is_valid_or_refused_in_one_line(argv, text):
    config = None
    if text is not None:
        config = _DIR / "scenario.yaml"
        config.write_text(text)
    try:
        spec = build_spec(argv, config)
        grid = spec.grid()
        validate_grid(grid)
    except PROJECT_ERRORS as err:
        event(f"refused: {type(err).__name__}")
        message = " ".join(str(err).split())     # the CLI prints it as one line
        # The message names what is wrong: a key, the file, or the offending value.
        keys = _given_keys(argv, text or "")
        if config is not None:        # a scenario file's missing keys take the default scenario's values
            keys |= set(yaml.safe_load(DEFAULT_SCENARIO.read_text()))
        named = keys | {k.removeprefix("policy.") for k in keys} | {str(config)} | {t.partition("=")[2] for t in argv}
        assert any(k and k in message for k in named), (message, argv, text)
        # Through the CLI: exit code 2 and that one line.
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main([*argv, *(["--config", str(config)] if config else []), "--out", str(_DIR / "never")])
        assert code == 2 and stderr.getvalue() == f"error: {message}\n"
        assert not (_DIR / "never").exists()
        return
    # Valid: the first configuration on the tiny trace runs to a row. (Policies that need a
    # training slice or a prediction track are only checked when they run; see the report.)
    runnable = [c for c in grid if c.trace.endswith("tiny.npz") and (c.train_fraction > 0 or c.policy != "static")]
    event(f"valid, run: {bool(runnable)}")
    if runnable:
        row, _ = run_config(dataclasses.replace(runnable[0], max_tokens=12))
        assert row["tokens_per_s"] > 0


# -- trace files ------------------------------------------------------------------------------

E, L, K = 6, 2, 2


def _base(lengths) -> Trace:
    trace = synthetic_trace(num_tokens=max(sum(lengths), 1), num_layers=L, num_experts=E, top_k=K,
                            num_requests=1, seed=len(lengths))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    T = int(starts[-1])
    return dataclasses.replace(trace, experts=trace.experts[:T], weights=trace.weights[:T], request_starts=starts)


MUTATIONS = [
    "experts_dtype", "id_too_big", "id_negative", "id_duplicate", "experts_shape", "weights_nan", "weights_negative",
    "weights_int", "weights_shape", "starts_shift", "starts_decrease", "starts_empty_request", "starts_float",
    "starts_2d", "starts_unsigned_decrease", "starts_end", "drop_array",
]


def _mutate(arrays: dict, name: str, draw) -> None:
    if not {"experts", "weights", "request_starts"} <= arrays.keys():
        return
    experts, weights, starts = arrays["experts"], arrays["weights"], arrays["request_starts"]
    T = experts.shape[0]
    if name == "experts_dtype":
        arrays["experts"] = experts.astype(draw(st.sampled_from([np.int8, np.int64, np.uint64, np.float32, bool])))
    elif name in ("id_too_big", "id_negative", "id_duplicate") and T:
        t, layer = draw(st.integers(0, T - 1)), draw(st.integers(0, L - 1))
        e = experts.astype(np.int64)
        e[t, layer, 1] = {"id_too_big": E + draw(st.integers(0, 300)), "id_negative": -1,
                          "id_duplicate": e[t, layer, 0]}[name]
        arrays["experts"] = e
    elif name == "experts_shape":
        arrays["experts"] = np.zeros((T, L + 1, K), dtype=np.uint8)
    elif name == "weights_nan" and len(weights) and np.issubdtype(weights.dtype, np.floating):
        w = weights.copy()
        w[draw(st.integers(0, len(w) - 1)), 0, 0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays["weights"] = w
    elif name == "weights_negative" and len(weights):
        w = weights.copy()
        w[draw(st.integers(0, len(w) - 1)), 1, 1] = -draw(st.floats(1e-6, 10))
        arrays["weights"] = w
    elif name == "weights_int":
        arrays["weights"] = np.nan_to_num(weights).astype(np.int32)
    elif name == "weights_shape":
        arrays["weights"] = weights[: max(T - 1, 0)]
    elif name == "starts_shift":
        arrays["request_starts"] = starts + 1
    elif name == "starts_decrease" and len(starts) > 2:
        s = starts.copy()
        s[1] = s[-1] + 1
        arrays["request_starts"] = s
    elif name == "starts_empty_request":
        arrays["request_starts"] = np.insert(starts, 1, starts[0])
    elif name == "starts_float":
        arrays["request_starts"] = starts.astype(np.float64)
    elif name == "starts_2d":
        arrays["request_starts"] = starts[None, :]
    elif name == "starts_unsigned_decrease" and len(starts) > 2:
        s = starts.copy()
        s[1] = s[-1] + 5
        arrays["request_starts"] = s.astype(np.uint64)
    elif name == "starts_end":
        arrays["request_starts"] = np.append(starts, starts[-1] + 3)
    elif name == "drop_array":
        del arrays[draw(st.sampled_from(["experts", "weights", "request_starts"]))]


def _problems(arrays: dict) -> set[str]:
    """The fields that break the schema, judged independently of the loader."""
    bad = {name for name in ("experts", "weights", "request_starts") if name not in arrays}
    if bad:
        return bad
    experts, weights, starts = arrays["experts"], arrays["weights"], arrays["request_starts"]
    T = experts.shape[0] if experts.ndim else 0
    if (experts.ndim != 3 or experts.shape[1:] != (L, K) or not np.issubdtype(experts.dtype, np.integer)
            or (experts.size and (experts.min() < 0 or experts.max() >= E
                                  or (np.sort(experts, axis=-1)[..., 1:] == np.sort(experts, axis=-1)[..., :-1]).any()))):
        bad.add("experts")
    if (weights.shape != (T, L, K) or not np.issubdtype(weights.dtype, np.floating)
            or not np.isfinite(weights).all() or (weights.size and weights.min() < 0)):
        bad.add("weights")
    if (starts.ndim != 1 or len(starts) < 2 or not np.issubdtype(starts.dtype, np.integer)
            or starts[0] != 0 or starts[-1] != T or not all(int(a) < int(b) for a, b in zip(starts, starts[1:]))):
        bad.add("request_starts")
    return bad


@st.composite
def trace_files(draw):
    lengths = draw(st.lists(st.integers(1, 5), min_size=0, max_size=5))   # one-token requests included
    trace = _base(lengths) if lengths else None
    if trace is None:       # an empty trace: no tokens, no requests
        base = _base([1])
        arrays = {"__meta__": np.frombuffer(json.dumps(base.meta.to_dict()).encode(), dtype=np.uint8),
                  "experts": base.experts[:0], "weights": base.weights[:0],
                  "request_starts": np.array([0], dtype=np.int64)}
    else:
        arrays = {"__meta__": np.frombuffer(json.dumps(trace.meta.to_dict()).encode(), dtype=np.uint8),
                  "experts": trace.experts, "weights": trace.weights, "request_starts": trace.request_starts}
    for name in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        _mutate(arrays, name, draw)
    return arrays


@FAST
@given(arrays=trace_files())
def test_trace_loads_correctly_or_names_the_field(arrays):
    path = _DIR / "fuzzed.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    expected = _problems(arrays)
    try:
        trace = load_trace(path)
    except TraceError as err:
        event("refused")
        message = str(err)
        assert "\n" not in message and message.startswith(f"{path}: ")
        field, problem, fix = message[len(f"{path}: "):].split(": ", 2)
        assert field in expected, (message, expected)
        assert problem and fix
        return
    event("loaded")
    assert not expected, f"loaded a trace with bad {expected}"
    np.testing.assert_array_equal(trace.experts, arrays["experts"])
    np.testing.assert_array_equal(trace.request_starts, arrays["request_starts"])
    assert trace.num_requests == len(arrays["request_starts"]) - 1 >= 1
