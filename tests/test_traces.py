import dataclasses
import io
import os
import time
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces import (
    DEFAULT_TRACE,
    SCHEMA_VERSION,
    Trace,
    TraceError,
    load_shape,
    load_trace,
    save_trace,
    synthetic_trace,
)
from traces.import_gpt_oss import evenly_spaced_generations, import_gpt_oss, main as import_main


def full_trace(num_tokens=60, num_requests=4, seed=0) -> Trace:
    """A small trace carrying every optional array, so round trips and slicing cover them all."""
    base = synthetic_trace(num_tokens, num_layers=3, num_experts=8, top_k=2, num_requests=num_requests, seed=seed)
    rng = np.random.default_rng(seed)
    T, L, E, H = num_tokens, 3, 8, base.model.hidden_size
    hidden_token_index = np.arange(0, T, 3, dtype=np.int64)
    words = [f"w{t}é " for t in range(T)]
    encoded = [w.encode() for w in words]
    return dataclasses.replace(
        base,
        router_probs=rng.random((T, L, E)).astype(np.float16),
        hidden_states=rng.standard_normal((len(hidden_token_index), L, H)).astype(np.float16),
        hidden_token_index=hidden_token_index,
        predictions={"gate": rng.random((T, L, 2, E)).astype(np.float16)},
        timings={"layer_compute_us": rng.random((T, L)).astype(np.float32), "step_ns": np.arange(T, dtype=np.int64)},
        text_bytes=np.frombuffer(b"".join(encoded), dtype=np.uint8),
        text_offsets=np.concatenate([[0], np.cumsum([len(b) for b in encoded])]).astype(np.int64),
    )


def assert_traces_equal(a: Trace, b: Trace):
    assert a.meta == b.meta
    for name in ("experts", "weights", "request_starts", "router_probs", "hidden_states", "hidden_token_index",
                 "text_bytes", "text_offsets"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)
            assert x.dtype == y.dtype, name
    for name in ("predictions", "timings"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}.{k}")


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_keeps_every_array_and_meta(tmp_path, compress):
    trace = full_trace()
    path = tmp_path / "t.npz"
    save_trace(trace, path, compress=compress)
    loaded = load_trace(path)
    assert_traces_equal(trace, loaded)
    assert loaded.meta.schema_version == SCHEMA_VERSION
    assert loaded.token_text(5) == "w5é "
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temp file left behind


def test_save_stores_small_id_dtype_and_replaces_atomically(tmp_path):
    trace = synthetic_trace(20, 2, 300, 3)
    trace = dataclasses.replace(trace, experts=trace.experts.astype(np.int64))
    path = tmp_path / "t.npz"
    path.write_bytes(b"old")
    save_trace(trace, path)
    assert load_trace(path).experts.dtype == np.uint16
    small = synthetic_trace(20, 2, 8, 2)
    save_trace(dataclasses.replace(small, experts=small.experts.astype(np.int32)), path)
    assert load_trace(path).experts.dtype == np.uint8


def test_save_refuses_an_invalid_trace(tmp_path):
    trace = synthetic_trace(20, 2, 8, 2)
    bad = dataclasses.replace(trace, request_starts=np.array([0, 5], dtype=np.int64))
    with pytest.raises(TraceError, match="request_starts"):
        save_trace(bad, tmp_path / "t.npz")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- broken files


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "good.npz"
    save_trace(full_trace(), path)
    return path


def raw_arrays(path) -> dict:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def rewrite(path, **changes) -> None:
    """Write the arrays of `path` back with `changes` applied (None removes an array)."""
    arrays = raw_arrays(path)
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def meta_bytes(d: dict) -> np.ndarray:
    import json

    return np.frombuffer(json.dumps(d).encode(), dtype=np.uint8)


def meta_of(path) -> dict:
    import json

    return json.loads(raw_arrays(path)["__meta__"].tobytes())


def expect_error(path, *words):
    with pytest.raises(TraceError) as e:
        load_trace(path)
    message = str(e.value)
    assert str(path) in message
    for w in words:
        assert w in message, message
    return message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.npz", "no such trace file", "check the path")


@pytest.mark.parametrize("keep_fraction", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_truncated_file(saved, keep_fraction):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep_fraction)])
    expect_error(saved, "file", "truncated or corrupt", "re-export")


def test_flipped_bytes_inside_compressed_data(saved):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo("weights.npy")
    # Flip bytes in the middle of the member's data (past its 30-byte local header and name).
    start = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    for i in range(start, start + 8):
        data[i] ^= 0xFF
    saved.write_bytes(bytes(data))
    expect_error(saved, "truncated or corrupt")


def test_not_a_zip(tmp_path):
    """A file that is no zip at all is named as not a trace (np.load alone would blame pickling)."""
    path = tmp_path / "t.npz"
    path.write_text("hello")
    message = expect_error(path, "not an .npz trace file", "a trace is an .npz (zip)", "save_trace")
    assert "pickle" not in message and "truncated" not in message
    np.save(tmp_path / "one.npy", np.zeros(3))
    expect_error(tmp_path / "one.npy", "single .npy array, not an .npz trace file")


def test_pickled_object_array_is_refused(saved):
    rewrite(saved, experts=np.array([object()], dtype=object))
    expect_error(saved, "experts", "object array", "numeric arrays only")


@pytest.mark.parametrize("name", ["weights", "router_probs"])
def test_negative_probabilities(saved, name):
    values = raw_arrays(saved)[name].copy()
    values[4, 2, 1] = -0.5
    rewrite(saved, **{name: values})
    expect_error(saved, name, "negative value -0.5 at index (4, 2, 1)", "probabilities")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint64])
def test_unsigned_request_starts_that_decrease(saved, dtype):
    """An unsigned decrease must not wrap into a huge positive step and pass."""
    rewrite(saved, request_starts=np.array([0, 40, 30, 60], dtype=dtype))
    expect_error(saved, "request_starts", "strictly increasing")


def test_saved_trace_is_readable_like_any_written_file(saved):
    umask = os.umask(0o022)
    os.umask(umask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_meta(saved):
    rewrite(saved, __meta__=None)
    expect_error(saved, "__meta__", "missing")


def test_bad_meta_json(saved):
    rewrite(saved, __meta__=np.frombuffer(b"{not json", dtype=np.uint8))
    expect_error(saved, "__meta__", "JSON")


@pytest.mark.parametrize("version, fix", [(2, "upgrade moe-offload-lab"), (0, "re-import")])
def test_wrong_schema_version(saved, version, fix):
    rewrite(saved, __meta__=meta_bytes(meta_of(saved) | {"schema_version": version}))
    expect_error(saved, "schema_version", fix)


def test_meta_missing_key_and_bad_model(saved):
    meta = meta_of(saved)
    rewrite(saved, __meta__=meta_bytes({k: v for k, v in meta.items() if k != "licence"}))
    expect_error(saved, "__meta__", "licence")
    rewrite(saved, __meta__=meta_bytes(meta | {"model": meta["model"] | {"top_k": 0}}))
    expect_error(saved, "__meta__.model", "top_k")


@pytest.mark.parametrize("name", ["experts", "weights", "request_starts"])
def test_missing_required_array(saved, name):
    rewrite(saved, **{name: None})
    expect_error(saved, name, "required")


def test_unknown_array_name(saved):
    rewrite(saved, pred_gate=np.zeros(3))
    expect_error(saved, "pred_gate", "pred.<name>")


def test_expert_id_out_of_range_names_token_layer_max_and_e(saved):
    experts = raw_arrays(saved)["experts"].copy()
    experts[7, 2, 1] = 8
    rewrite(saved, experts=experts)
    expect_error(saved, "experts", "token 7", "layer 2", "max 8", "num_experts 8")


def test_negative_expert_id(saved):
    experts = raw_arrays(saved)["experts"].astype(np.int16)
    experts[3, 0, 0] = -1
    rewrite(saved, experts=experts)
    expect_error(saved, "experts", "token 3", "layer 0")


def test_duplicate_expert_ids(saved):
    experts = raw_arrays(saved)["experts"].copy()
    experts[11, 1, 1] = experts[11, 1, 0]
    rewrite(saved, experts=experts)
    expect_error(saved, "experts", "duplicate", "token 11", "layer 1")


def test_float_expert_ids(saved):
    rewrite(saved, experts=raw_arrays(saved)["experts"].astype(np.float32))
    expect_error(saved, "experts", "integer")


@pytest.mark.parametrize("name", ["weights", "router_probs", "pred.gate", "hidden_states", "time.layer_compute_us"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf(saved, name, bad):
    values = raw_arrays(saved)[name].copy()
    values[2, 1] = bad
    rewrite(saved, **{name: values})
    expect_error(saved, name, "NaN or inf")


@pytest.mark.parametrize(
    "name, shape",
    [
        ("experts", (60, 3, 3)),  # top_k differs from meta.model
        ("experts", (60, 4, 2)),  # num_layers differs
        ("weights", (59, 3, 2)),
        ("router_probs", (60, 3, 7)),  # E differs from num_experts
        ("pred.gate", (60, 3, 8)),  # not [T, L, D, E]
        ("pred.gate", (60, 3, 2, 9)),
        ("hidden_states", (20, 3, 65)),  # H differs from hidden_size
        ("time.step_ns", (59,)),
    ],
)
def test_wrong_shapes(saved, name, shape):
    dtype = raw_arrays(saved)[name].dtype
    rewrite(saved, **{name: np.zeros(shape, dtype=dtype)})
    expect_error(saved, name, "expected" if not name.startswith("time.") else "first dimension")


@pytest.mark.parametrize(
    "starts, words",
    [
        ([1, 30, 60], ["start at 0"]),
        ([0, 30, 59], ["end at T=60"]),
        ([0, 30, 30, 60], ["strictly increasing", "request 1"]),
        ([0, 40, 30, 60], ["strictly increasing"]),
        ([60], ["R >= 1"]),
    ],
)
def test_bad_request_starts(saved, starts, words):
    rewrite(saved, request_starts=np.array(starts, dtype=np.int64))
    expect_error(saved, "request_starts", *words)


def test_hidden_states_without_index_and_bad_text(saved):
    rewrite(saved, hidden_token_index=None)
    expect_error(saved, "hidden_states", "both")
    rewrite(saved, hidden_states=None, text_offsets=np.arange(61, dtype=np.int64) * 100)
    expect_error(saved, "text_offsets")


# ---------------------------------------------------------------- slicing


@st.composite
def request_lengths(draw):
    return draw(st.lists(st.integers(1, 12), min_size=2, max_size=12))


def trace_with_requests(lengths) -> Trace:
    trace = full_trace(num_tokens=sum(lengths), num_requests=1, seed=len(lengths))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return dataclasses.replace(trace, request_starts=starts)


def concat(parts: list[Trace]) -> dict:
    """Per-token arrays of consecutive parts joined back together, token indices un-rebased."""
    offsets = np.cumsum([0] + [p.num_tokens for p in parts])
    byte_offsets = np.cumsum([0] + [len(p.text_bytes) for p in parts])
    return {
        "experts": np.concatenate([p.experts for p in parts]),
        "weights": np.concatenate([p.weights for p in parts]),
        "router_probs": np.concatenate([p.router_probs for p in parts]),
        "pred.gate": np.concatenate([p.predictions["gate"] for p in parts]),
        "time.step_ns": np.concatenate([p.timings["step_ns"] for p in parts]),
        "request_starts": np.concatenate([parts[0].request_starts[:1]] +
                                         [p.request_starts[1:] + o for p, o in zip(parts, offsets)]),
        "hidden_states": np.concatenate([p.hidden_states for p in parts]),
        "hidden_token_index": np.concatenate([p.hidden_token_index + o for p, o in zip(parts, offsets)]),
        "text_bytes": np.concatenate([p.text_bytes for p in parts]),
        "text_offsets": np.concatenate([parts[0].text_offsets[:1]] +
                                       [p.text_offsets[1:] + o for p, o in zip(parts, byte_offsets)]),
    }


def as_arrays(trace: Trace) -> dict:
    return concat([trace])


@settings(max_examples=40, deadline=None)
@given(lengths=request_lengths(), fraction=st.floats(0.01, 0.99))
def test_split_parts_concatenate_to_the_original(lengths, fraction):
    trace = trace_with_requests(lengths)
    first, second = trace.split(fraction)
    assert first.num_requests >= 1 and second.num_requests >= 1
    assert first.num_requests == min(max(int(np.ceil(fraction * len(lengths))), 1), len(lengths) - 1)
    for part in (first, second):
        assert part.request_starts[0] == 0 and part.request_starts[-1] == part.num_tokens
    joined, original = concat([first, second]), as_arrays(trace)
    for k in original:
        np.testing.assert_array_equal(joined[k], original[k], err_msg=k)


@settings(max_examples=40, deadline=None)
@given(lengths=request_lengths(), data=st.data())
def test_select_requests_matches_the_token_range(lengths, data):
    trace = trace_with_requests(lengths)
    cut = sorted(data.draw(st.lists(st.integers(1, len(lengths) - 1), max_size=3, unique=True)))
    bounds = [0, *cut, len(lengths)]
    parts = [trace.select_requests(a, b) for a, b in zip(bounds, bounds[1:])]
    joined, original = concat(parts), as_arrays(trace)
    for k in original:
        np.testing.assert_array_equal(joined[k], original[k], err_msg=k)
    start = data.draw(st.integers(0, len(lengths) - 1))
    part = trace.select_requests(start, start + 1)
    t0 = trace.request_starts[start]
    assert [part.token_text(i) for i in range(part.num_tokens)] == [
        trace.token_text(t0 + i) for i in range(part.num_tokens)
    ]


def test_split_edge_cases():
    trace = trace_with_requests([5, 6, 7])
    assert trace.split(0.0) == (None, trace)
    assert trace.split(1.0) == (trace, None)
    with pytest.raises(ValueError, match="at least 2"):
        trace_with_requests([5]).split(0.5)
    with pytest.raises(ValueError, match="train_fraction"):
        trace.split(1.5)
    with pytest.raises(ValueError, match="num_requests"):
        trace.select_requests(2, 2)


def test_head_tokens_keeps_whole_requests():
    trace = trace_with_requests([5, 6, 7])
    assert trace.head_tokens(1).num_tokens == 5
    assert trace.head_tokens(5).num_tokens == 5
    assert trace.head_tokens(6).num_tokens == 11
    assert trace.head_tokens(1000).num_tokens == 18


# ---------------------------------------------------------------- importer


def fake_source(path, lengths=(3, 5, 2, 4, 6)):
    rng = np.random.default_rng(1)
    T = sum(lengths)
    experts = np.stack([np.stack([rng.permutation(32)[:4] for _ in range(24)]) for _ in range(T)]).astype(np.uint8)
    words = [f"t{i}".encode() for i in range(T)]
    arrays = {
        "experts": experts,
        "probs": rng.random((T, 24, 4)).astype(np.float16),
        "gen_start": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "gen_dataset": np.array(["mmlu_test", "mmlu_dev", "gpqa_main", "gpqa_main", "mmlu_test"]),
        "gen_category": np.array(["a", "b", "c", "d", "e"]),
        "token_bytes": np.frombuffer(b"".join(words), dtype=np.uint8),
        "token_offsets": np.concatenate([[0], np.cumsum([len(w) for w in words])]).astype(np.int64),
    }
    np.savez(path, **arrays)
    return arrays


def test_importer_copies_values_unchanged(tmp_path):
    src = tmp_path / "src.npz"
    arrays = fake_source(src)
    out = tmp_path / "out.npz"
    import_main(["--src", str(src), "--out", str(out)])
    trace = load_trace(out)
    np.testing.assert_array_equal(trace.experts, arrays["experts"])
    np.testing.assert_array_equal(trace.weights, arrays["probs"])
    assert trace.weights.dtype == np.float16
    np.testing.assert_array_equal(trace.request_starts, arrays["gen_start"])
    assert trace.token_text(7) == "t7"
    assert trace.meta.model == load_shape("gpt-oss-20b")
    assert trace.meta.licence == "Apache-2.0"
    assert "72b368f6" in trace.meta.source
    assert trace.meta.extra["datasets"] == arrays["gen_dataset"].tolist()


def test_importer_selects_generations(tmp_path):
    src = tmp_path / "src.npz"
    arrays = fake_source(src)
    out = tmp_path / "out.npz"
    import_main(["--src", str(src), "--out", str(out), "--generations", "1,3", "--no-text"])
    trace = load_trace(out)
    assert trace.text_bytes is None
    np.testing.assert_array_equal(trace.request_starts, [0, 5, 9])
    np.testing.assert_array_equal(trace.experts, np.concatenate([arrays["experts"][3:8], arrays["experts"][10:14]]))
    assert trace.meta.extra["generations"] == [1, 3]
    assert trace.meta.extra["categories"] == ["b", "d"]

    import_main(["--src", str(src), "--out", str(out), "--sample-tokens", "10"])
    sampled = load_trace(out)
    assert sampled.meta.extra["generations"] == [0, 2, 4]  # [0, 4] holds 9 tokens, one short of 10
    assert sampled.token_text(3) == "t8"


def test_evenly_spaced_generations():
    starts = np.array([0, 10, 20, 30, 40, 50])
    assert evenly_spaced_generations(starts, 1).tolist() == [0]
    assert evenly_spaced_generations(starts, 15).tolist() == [0, 4]
    assert evenly_spaced_generations(starts, 25).tolist() == [0, 2, 4]
    assert evenly_spaced_generations(starts, 10_000).tolist() == [0, 1, 2, 3, 4]


def test_importer_names_missing_source_array(tmp_path):
    src = tmp_path / "src.npz"
    np.savez(src, experts=np.zeros((2, 24, 4), np.uint8))
    with pytest.raises(ValueError, match="probs"):
        import_gpt_oss(src)


def test_importer_without_its_source_names_the_file_and_src(tmp_path, capsys):
    missing = tmp_path / "elsewhere" / "gpt-oss-20b-dev.npz"
    with pytest.raises(SystemExit) as exit_:
        import_main(["--src", str(missing), "--sample-tokens", "6000", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"{missing}: no such file" in err and "--src" in err and "Traceback" not in err
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("sample", [["--sample-tokens", "6000"], []])
def test_importer_with_a_truncated_source_names_the_file_and_the_fix(tmp_path, capsys, sample):
    src = tmp_path / "gpt-oss-20b-dev.npz"
    np.savez(src, gen_start=np.arange(4, dtype=np.int64), experts=np.zeros((8, 24, 4), np.uint8))
    src.write_bytes(src.read_bytes()[:200])          # an interrupted copy
    with pytest.raises(SystemExit) as exit_:
        import_main(["--src", str(src), *sample, "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and str(src) in err and "--src" in err and "Traceback" not in err
    assert not (tmp_path / "x.npz").exists()


def test_committed_sample_matches_the_measured_routing_facts():
    trace = load_trace(DEFAULT_TRACE)
    assert DEFAULT_TRACE.stat().st_size < 3_000_000
    assert trace.meta.model.name == "gpt-oss-20b"
    assert trace.meta.licence == "Apache-2.0"
    assert trace.experts.shape[1:] == (24, 4) and trace.num_tokens >= 5000
    assert len(set(trace.meta.extra["datasets"])) >= 3
    e = trace.experts
    overlap = (e[1:, :, :, None] == e[:-1, :, None, :]).any(axis=3).mean(axis=2)  # [T-1, L]
    within_request = np.ones(len(e) - 1, dtype=bool)
    within_request[trace.request_starts[1:-1] - 1] = False
    per_layer = overlap[within_request].mean(axis=0)
    assert 0.1 <= per_layer[0] <= 0.3
    assert 0.3 <= per_layer[1:].mean() <= 0.65


# ---------------------------------------------------------------- synthetic


def consecutive_overlap(trace: Trace) -> float:
    e = trace.experts
    return float((e[1:, :, :, None] == e[:-1, :, None, :]).any(axis=3).mean())


def test_synthetic_is_deterministic_and_valid(tmp_path):
    kwargs = dict(num_tokens=500, num_layers=4, num_experts=16, top_k=4, num_requests=5, cross_layer_locality=0.5)
    a, b = synthetic_trace(seed=3, **kwargs), synthetic_trace(seed=3, **kwargs)
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert not np.array_equal(a.experts, synthetic_trace(seed=4, **kwargs).experts)
    assert a.weights.dtype == np.float32 and (a.weights > 0).all()
    np.testing.assert_allclose(a.weights.sum(axis=-1), 1.0, rtol=1e-5)
    assert a.model.name == "synthetic-L4-E16-k4" and a.model.expert_bytes("bf16") == 1_000_000
    save_trace(a, tmp_path / "s.npz")  # validates: ids in range and distinct per (token, layer)
    assert_traces_equal(a, load_trace(tmp_path / "s.npz"))


@pytest.mark.parametrize("skew", [0.0, 1.0])
def test_temporal_locality_raises_consecutive_overlap(skew):
    low = synthetic_trace(3000, 4, 32, 4, popularity_skew=skew, temporal_locality=0.0)
    high = synthetic_trace(3000, 4, 32, 4, popularity_skew=skew, temporal_locality=0.6)
    assert consecutive_overlap(high) > consecutive_overlap(low) + 0.3
    if skew == 0.0:
        assert abs(consecutive_overlap(low) - 4 / 32) < 0.02  # uniform: overlap of random sets


def test_cross_layer_locality_makes_the_next_layer_predictable():
    def follow_rate(trace):
        e = trace.experts.astype(np.int64)
        # Most frequent layer-1 expert given each layer-0 expert in the same slot.
        joint = np.zeros((32, 32))
        np.add.at(joint, (e[:, 0].ravel(), e[:, 1].ravel()), 1)
        return joint.max(axis=1).sum() / joint.sum()

    plain = synthetic_trace(3000, 2, 32, 4, popularity_skew=0.0, cross_layer_locality=0.0)
    linked = synthetic_trace(3000, 2, 32, 4, popularity_skew=0.0, cross_layer_locality=0.7)
    assert follow_rate(linked) > follow_rate(plain) + 0.3


def test_popularity_skew_concentrates_choices():
    counts = np.bincount(synthetic_trace(2000, 1, 32, 2, popularity_skew=2.0).experts.ravel(), minlength=32)
    assert counts.max() > 5 * np.median(counts)


# ---------------------------------------------------------------- benchmark


def test_benchmark_load_200k_tokens(tmp_path):
    """Load + validate 200k tokens x 24 layers x top-4 with weights (target < 1 s); prints, never fails on time."""
    trace = synthetic_trace(200_000, 24, 32, 4, num_requests=500)
    trace = dataclasses.replace(trace, weights=trace.weights.astype(np.float16))
    path = tmp_path / "big.npz"
    save_trace(trace, path)
    start = time.perf_counter()
    loaded = load_trace(path)
    seconds = time.perf_counter() - start
    print(f"\nload_trace 200k x 24 x 4: {seconds:.3f} s ({path.stat().st_size / 1e6:.1f} MB)")
    assert loaded.num_tokens == 200_000
