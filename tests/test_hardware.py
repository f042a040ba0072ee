import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hardware.profile import (
    ComputeCost,
    ConstantCopyCost,
    HardwareProfile,
    HardwareProfileError,
    MeasuredCompute,
    TabulatedCopyCost,
    available_hardware,
    hardware_from_dict,
    hardware_to_dict,
    load_hardware,
)
from traces.model_shape import ModelShape, load_shape

REPO = Path(__file__).resolve().parents[1]

MiB = 1 << 20
GiB = 1 << 30

H100_MEASURED_GBps_BY_MiB = {0.25: 19.8, 1: 43.8, 4: 52.3, 16: 54.5, 64: 55.0}

# The small model our team measured on the same H100: 16 layers, 8 experts, top-2, hidden 1024,
# 25 MB bf16 experts (3 * 1024 * 4096 * 2 B).
SMALL_MEASURED = ModelShape(
    name="measured-16x8-h1024",
    num_layers=16,
    num_experts=8,
    top_k=2,
    hidden_size=1024,
    expert_intermediate_size=4096,
    num_attention_heads=8,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=32000,
)


@pytest.fixture(scope="module")
def h100() -> HardwareProfile:
    return load_hardware("h100-pcie5")


@pytest.fixture(scope="module")
def a100() -> HardwareProfile:
    return load_hardware("a100-pcie4")


def _profile_dict(**changes) -> dict:
    d = hardware_to_dict(load_hardware("h100-pcie5"))
    d.update(changes)
    return d


def _write(tmp_path, data, name="hw.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# --- profiles -----------------------------------------------------------------------------------


def test_committed_profiles_load(h100, a100):
    assert available_hardware() == ["a100-pcie4", "h100-pcie5", "h100-pcie5-measured"]
    measured = load_hardware("h100-pcie5-measured")
    assert "moe-lm" in dict(measured.measured_compute) and measured.copy.copy_ns(25 * 2**20) > 0
    assert h100.name == "h100-pcie5" and a100.name == "a100-pcie4"
    for p in (h100, a100):
        assert isinstance(p.copy, TabulatedCopyCost)
        assert p.copy_engines == 1
        assert p.source
    assert "not our measurement" in a100.source.lower()


@pytest.mark.parametrize("mib, gbps", sorted(H100_MEASURED_GBps_BY_MiB.items()))
def test_h100_copy_reproduces_measured_points(h100, mib, gbps):
    nbytes = int(mib * MiB)
    assert h100.copy.copy_ns(nbytes) == pytest.approx(nbytes / gbps, rel=0.01)


@pytest.mark.parametrize("mib, gbps", [(0.25, 10), (1, 20), (4, 24), (16, 25)])
def test_a100_copy_reproduces_table(a100, mib, gbps):
    nbytes = int(mib * MiB)
    assert a100.copy.copy_ns(nbytes) == pytest.approx(nbytes / gbps, rel=0.01)


def test_h100_25MB_expert_copy_matches_measured_0_46_ms(h100):
    nbytes = SMALL_MEASURED.expert_bytes("bf16")
    assert nbytes == pytest.approx(25e6, rel=0.02)
    assert h100.copy.copy_ns(nbytes) == pytest.approx(460_000, rel=0.10)


def test_h100_small_model_attention_matches_measured_0_02_ms(h100):
    cost = h100.compute_cost(SMALL_MEASURED, "bf16")
    assert cost.attention_ns(0) == pytest.approx(20_000, rel=0.10)


def test_h100_mixtral_expert_analytic_matches_0_14_ms(h100):
    mixtral = load_shape("mixtral-8x7b")
    assert mixtral.expert_bytes("bf16") == 3 * 4096 * 14336 * 2
    cost = h100.compute_cost(mixtral, "bf16")
    assert cost.basis == "analytic"
    assert cost.expert_ns == pytest.approx(140_000, rel=0.10)
    # quantised experts move fewer bytes, so compute faster
    assert h100.compute_cost(mixtral, "int4").expert_ns < cost.expert_ns


def test_analytic_compute_formulas(h100):
    mixtral = load_shape("mixtral-8x7b")
    c = h100.compute_cost(mixtral, "bf16")
    hbm, launch_ns = h100.hbm_GBps, h100.kernel_launch_us * 1000
    assert c.expert_ns == round(3 * launch_ns + mixtral.expert_bytes("bf16") / hbm)
    assert c.attention_base_ns == round(4 * launch_ns + mixtral.attention_params * 2 / hbm)
    assert c.attention_per_ctx_ns == pytest.approx(mixtral.kv_bytes_per_token() / hbm)
    assert c.router_ns == round(launch_ns + mixtral.hidden_size * mixtral.num_experts * 2 / hbm)
    assert c.token_overhead_ns == round(20_000 + mixtral.vocab_size * mixtral.hidden_size * 2 / hbm)
    assert c.layer_overhead_ns == 5_000
    assert c.attention_ns(4096) == round(c.attention_base_ns + 4096 * c.attention_per_ctx_ns)


@pytest.mark.parametrize("model", ["gpt-oss-20b", "mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b"])
@pytest.mark.parametrize("hardware", ["h100-pcie5", "a100-pcie4"])
def test_compute_costs_are_positive_integers(model, hardware):
    shape = load_shape(model)
    c = load_hardware(hardware).compute_cost(shape, "bf16")
    for v in (c.attention_base_ns, c.router_ns, c.expert_ns, c.layer_overhead_ns, c.token_overhead_ns):
        assert type(v) is int and v > 0
    assert type(c.attention_ns(1000)) is int and c.attention_ns(1000) > c.attention_ns(0)


# --- the tabulated copy model ---------------------------------------------------------------------


def test_continuity_at_table_ends(h100):
    copy = h100.copy
    lo, hi = 256 * 1024, 64 * MiB
    for edge in (lo, hi):
        assert abs(copy.copy_ns(edge + 1) - copy.copy_ns(edge)) <= 1
        assert abs(copy.copy_ns(edge) - copy.copy_ns(edge - 1)) <= 1
    # below the table the time tends to the latency
    assert copy.copy_ns(1) == pytest.approx(9_500, abs=1)
    assert copy.copy_ns(lo // 2) == pytest.approx((9_500 + lo / 19.8) / 2, abs=1)


def test_extrapolation_above_table_is_linear_at_last_bandwidth(h100):
    copy = h100.copy
    t64 = copy.copy_ns(64 * MiB)
    for extra_mib in (1, 64, 1000, 4000):
        extra = extra_mib * MiB
        assert copy.copy_ns(64 * MiB + extra) - t64 == pytest.approx(extra / 55.0, abs=1)


def test_copy_outputs_are_integers(h100):
    for n in (1, 1000, MiB + 7, 3 * MiB, 100 * MiB):
        assert type(h100.copy.copy_ns(n)) is int
    assert h100.copy.copy_ns(0) == 0
    assert ConstantCopyCost(0.0, 1e6).copy_ns(1) == 1  # >= 1 ns for any real copy
    with pytest.raises(ValueError):
        h100.copy.copy_ns(-1)


@given(st.integers(min_value=1, max_value=4 * GiB), st.integers(min_value=1, max_value=4 * GiB))
@pytest.mark.parametrize("hardware", ["h100-pcie5", "a100-pcie4"])
def test_copy_time_non_decreasing_in_size(hardware, a, b):
    copy = load_hardware(hardware).copy
    small, large = sorted((a, b))
    assert copy.copy_ns(small) <= copy.copy_ns(large)


@given(st.integers(min_value=1, max_value=4 * GiB))
def test_copy_time_non_decreasing_adjacent_bytes(n):
    copy = load_hardware("h100-pcie5").copy
    assert copy.copy_ns(n) <= copy.copy_ns(n + 1)


def test_tabulated_validation_names_the_point():
    with pytest.raises(ValueError, match="point 1"):
        TabulatedCopyCost(1.0, ((2 * MiB, 10.0), (MiB, 20.0)))  # sizes not increasing
    with pytest.raises(ValueError, match="point 1"):
        TabulatedCopyCost(1.0, ((MiB, 10.0), (2 * MiB, 0.0)))  # bandwidth not positive
    with pytest.raises(ValueError, match="point 2"):
        # time at 4 MiB (4194304 / 100 = 41.9 us) below time at 2 MiB (2097152 / 13 = 161.3 us)
        TabulatedCopyCost(1.0, ((MiB, 10.0), (2 * MiB, 13.0), (4 * MiB, 100.0)))
    with pytest.raises(ValueError, match="point 1"):
        # endpoint times increase (10.5 -> 10.6 us) but log-linear interpolation would dip between them
        TabulatedCopyCost(1.0, ((4096 * 16, 6.25), (4096 * 256, 99.0)))
    with pytest.raises(ValueError, match="copy_latency_us"):
        TabulatedCopyCost(100.0, ((MiB, 50.0),))  # smallest point faster than the latency


def test_tabulated_single_point_is_latency_then_linear():
    copy = TabulatedCopyCost(10.0, ((MiB, 50.0),))
    assert copy.copy_ns(MiB) == round(MiB / 50.0)
    assert copy.copy_ns(3 * MiB) == round(3 * MiB / 50.0)
    assert copy.copy_ns(1) == pytest.approx(10_000, abs=1)


# --- constant copy cost -------------------------------------------------------------------------


def test_constant_copy_cost_math():
    c = ConstantCopyCost(copy_latency_us=10.0, pcie_GBps=25.0)
    assert c.copy_ns(25_000_000) == 10_000 + 1_000_000
    assert c.copy_ns(1) == 10_000  # 10 us + 0.04 ns
    assert c.copy_ns(100) == 10_004
    with pytest.raises(ValueError, match="pcie_GBps"):
        ConstantCopyCost(copy_latency_us=10.0, pcie_GBps=0)
    with pytest.raises(ValueError, match="copy_latency_us"):
        ConstantCopyCost(copy_latency_us=-1.0, pcie_GBps=25.0)


# --- overrides ------------------------------------------------------------------------------------


def test_with_overrides(h100):
    p = h100.with_overrides(pcie_GBps=25.0)
    assert p.copy == ConstantCopyCost(copy_latency_us=9.5, pcie_GBps=25.0)
    assert p.hbm_GBps == h100.hbm_GBps and p.name == h100.name
    assert "pcie_GBps=25.0" in p.source
    assert h100.copy.copy_latency_us == 9.5  # the original is untouched

    p = h100.with_overrides(pcie_GBps=25.0, copy_latency_us=2.0)
    assert p.copy == ConstantCopyCost(copy_latency_us=2.0, pcie_GBps=25.0)

    p = h100.with_overrides(copy_latency_us=5.0)
    assert isinstance(p.copy, TabulatedCopyCost) and p.copy.points == h100.copy.points
    assert p.copy.copy_ns(1) == pytest.approx(5_000, abs=1)

    p = h100.with_overrides(copy_engines=2, hbm_GBps=3350.0)
    assert (p.copy_engines, p.hbm_GBps, p.copy) == (2, 3350.0, h100.copy)
    mixtral = load_shape("mixtral-8x7b")
    assert p.compute_cost(mixtral, "bf16").expert_ns < h100.compute_cost(mixtral, "bf16").expert_ns

    assert h100.with_overrides() is h100


def test_with_overrides_rejects_unknown_and_bad_values(h100):
    with pytest.raises(ValueError, match="valid keys.*pcie_GBps.*copy_latency_us.*copy_engines.*hbm_GBps"):
        h100.with_overrides(pcie_GBs=10)
    with pytest.raises(ValueError, match="copy_engines"):
        h100.with_overrides(copy_engines=0)
    with pytest.raises(ValueError, match="hbm_GBps"):
        h100.with_overrides(hbm_GBps=-1.0)
    with pytest.raises(HardwareProfileError, match="(?s)hardware h100-pcie5: copy_latency_us=50.0.*give pcie_GBps too"):
        h100.with_overrides(copy_latency_us=50.0)  # slower than the 0.25 MiB copy: table inconsistent


# --- loading errors -------------------------------------------------------------------------------


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"'h200-nvlink'.*a100-pcie4.*h100-pcie5"):
        load_hardware("h200-nvlink")


def test_missing_file_path():
    with pytest.raises(ValueError, match="does not exist"):
        load_hardware("/nonexistent/hw.yaml")


def test_missing_field_is_named(tmp_path):
    d = _profile_dict()
    del d["hbm_GBps"]
    path = _write(tmp_path, d)
    with pytest.raises(ValueError, match=rf"{path}.*missing.*hbm_GBps"):
        load_hardware(str(path))


@pytest.mark.parametrize("field", ["hbm_GBps", "copy_latency_us", "kernel_launch_us", "kernels_per_expert"])
def test_negative_field_is_named(tmp_path, field):
    path = _write(tmp_path, _profile_dict(**{field: -3}))
    with pytest.raises(ValueError, match=rf"{path}.*{field}.*>= 0"):
        load_hardware(str(path))


def test_zero_bandwidth_and_bad_types_are_named(tmp_path):
    with pytest.raises(ValueError, match="hbm_GBps must be > 0"):
        load_hardware(str(_write(tmp_path, _profile_dict(hbm_GBps=0))))
    with pytest.raises(ValueError, match="'kernels_per_expert' must be an integer"):
        load_hardware(str(_write(tmp_path, _profile_dict(kernels_per_expert=2.5))))
    with pytest.raises(ValueError, match="'layer_overhead_us' must be a number"):
        load_hardware(str(_write(tmp_path, _profile_dict(layer_overhead_us="5us"))))


def test_unknown_field_and_copy_model_choice(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field.*hbm_GBs"):
        load_hardware(str(_write(tmp_path, _profile_dict(hbm_GBs=1))))
    with pytest.raises(ValueError, match="exactly one of"):
        load_hardware(str(_write(tmp_path, _profile_dict(pcie_GBps=25))))
    d = _profile_dict(pcie_GBps=25)
    del d["h2d_GBps_by_MiB"]
    p = load_hardware(str(_write(tmp_path, d)))
    assert p.copy == ConstantCopyCost(copy_latency_us=9.5, pcie_GBps=25.0)


def test_bad_copy_table_names_file_and_point(tmp_path):
    path = _write(tmp_path, _profile_dict(h2d_GBps_by_MiB={0.25: 19.8, 1: 43.8, 4: -1}))
    with pytest.raises(ValueError, match=rf"{path}.*h2d_GBps_by_MiB\[4\]"):
        load_hardware(str(path))
    path = _write(tmp_path, _profile_dict(h2d_GBps_by_MiB={0.25: 19.8, 1: 43.8, 4: 500}))
    with pytest.raises(ValueError, match=rf"{path}.*point 2"):
        load_hardware(str(path))


def test_optional_fields_default(tmp_path):
    d = _profile_dict()
    del d["copy_engines"], d["measured_compute"]
    p = load_hardware(str(_write(tmp_path, d)))
    assert p.copy_engines == 1 and p.measured_compute == ()


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match=rf"{path}.*not valid YAML"):
        load_hardware(str(path))


# --- serialisation --------------------------------------------------------------------------------


@pytest.mark.parametrize("hardware", ["h100-pcie5", "a100-pcie4"])
def test_to_dict_round_trips_through_yaml_and_json(tmp_path, hardware):
    p = load_hardware(hardware)
    d = hardware_to_dict(p)
    assert d["h2d_GBps_by_MiB"][0.25] == p.copy.points[0][1]
    assert load_hardware(str(_write(tmp_path, d))) == p
    assert hardware_from_dict(json.loads(json.dumps(d))) == p
    overridden = p.with_overrides(pcie_GBps=12.5, copy_engines=2)
    assert hardware_from_dict(json.loads(json.dumps(hardware_to_dict(overridden)))) == overridden


# --- measured compute -------------------------------------------------------------------------------


def _measured(**changes) -> MeasuredCompute:
    fields = dict(
        precision="bf16",
        attention_us_by_ctx=((128, 30.0), (1024, 40.0), (4096, 70.0)),
        router_us=6.0,
        expert_us=150.0,
        layer_overhead_us=4.0,
        token_overhead_us=300.0,
    )
    fields.update(changes)
    return MeasuredCompute(**fields)


def test_measured_attention_interpolation_and_extrapolation():
    m = _measured()
    assert m.attention_us(128) == 30.0
    assert m.attention_us(576) == pytest.approx(35.0)
    assert m.attention_us(2560) == pytest.approx(55.0)
    assert m.attention_us(0) == 30.0  # flat below the first point
    assert m.attention_us(8192) == pytest.approx(70.0 + 4096 * 30.0 / 3072)  # last slope continues


def test_measured_extrapolation_slope_clamped_non_negative():
    m = _measured(attention_us_by_ctx=((0, 30.0), (1024, 40.0), (4096, 38.0)))
    assert m.attention_us(2560) == pytest.approx(39.0)
    assert m.attention_us(100_000) == 38.0
    assert _measured(attention_us_by_ctx=((0, 30.0),)).attention_us(10_000) == 30.0


def test_measured_compute_validation():
    with pytest.raises(ValueError, match="strictly increasing"):
        _measured(attention_us_by_ctx=((1024, 30.0), (128, 40.0)))
    with pytest.raises(ValueError, match="expert_us"):
        _measured(expert_us=-1.0)


def test_compute_cost_uses_measured_entry_for_model_and_precision(h100, tmp_path):
    mixtral = load_shape("mixtral-8x7b")
    p = dataclasses.replace(h100, measured_compute=(("mixtral-8x7b", _measured()),))
    c = p.compute_cost(mixtral, "bf16")
    assert c.basis == "measured"
    assert (c.router_ns, c.expert_ns, c.layer_overhead_ns, c.token_overhead_ns) == (6_000, 150_000, 4_000, 300_000)
    assert c.attention_base_ns == 30_000
    assert c.attention_per_ctx_ns == pytest.approx(30_000 / 3072)
    assert c.attention_ns(576) == 35_000 and type(c.attention_ns(577)) is int
    assert c.attention_ns(8192) == round(70_000 + 4096 * 30_000 / 3072)
    # another precision or another model falls back to the analytic model, and says so
    assert p.compute_cost(mixtral, "int4").basis == "analytic"
    assert p.compute_cost(load_shape("olmoe-1b-7b"), "bf16").basis == "analytic"
    # the same entry survives the YAML layout
    loaded = load_hardware(str(_write(tmp_path, hardware_to_dict(p))))
    assert loaded == p and loaded.compute_cost(mixtral, "bf16") == c


def test_measured_compute_yaml_errors_name_the_field(tmp_path):
    entry = {"attention_us_by_ctx": {0: 30.0}, "router_us": 6.0, "expert_us": -1.0,
             "layer_overhead_us": 4.0, "token_overhead_us": 300.0}
    path = _write(tmp_path, _profile_dict(measured_compute={"mixtral-8x7b": {"bf16": entry}}))
    with pytest.raises(ValueError, match=r"measured_compute\[mixtral-8x7b\]\[bf16\]\.expert_us"):
        load_hardware(str(path))
    del entry["expert_us"]
    path = _write(tmp_path, _profile_dict(measured_compute={"mixtral-8x7b": {"bf16": entry}}))
    with pytest.raises(ValueError, match=r"missing \['expert_us'\]"):
        load_hardware(str(path))
    # a misspelt precision would never match a run: refused, naming the valid ones
    entry["expert_us"] = 150.0
    path = _write(tmp_path, _profile_dict(measured_compute={"mixtral-8x7b": {"bf61": entry}}))
    with pytest.raises(HardwareProfileError, match=r"measured_compute\[mixtral-8x7b\]\[bf61\]: unknown precision 'bf61'.*bf16"):
        load_hardware(str(path))


def test_a_profile_measuring_other_models_says_so_for_a_run_it_does_not_measure(h100):
    p = dataclasses.replace(h100, measured_compute=(("mixtral-8x7b", _measured()),))
    mixtral = load_shape("mixtral-8x7b")
    assert p.unmatched_measurement_note(mixtral, "bf16") is None           # measured: nothing to say
    assert h100.unmatched_measurement_note(mixtral, "int4") is None        # measures nothing: analytic, as documented
    note = p.unmatched_measurement_note(load_shape("olmoe-1b-7b"), "bf16")
    assert "measures compute for mixtral-8x7b at bf16, not for olmoe-1b-7b at bf16" in note and "misspelt" in note
    assert "not for mixtral-8x7b at int4" in p.unmatched_measurement_note(mixtral, "int4")


def test_compute_cost_constant_attention_without_points():
    c = ComputeCost(attention_base_ns=10_000, attention_per_ctx_ns=0.5, router_ns=1, expert_ns=2,
                    layer_overhead_ns=3, token_overhead_ns=4)
    assert c.attention_ns(0) == 10_000 and c.attention_ns(1001) == 10_501
    assert math.isclose(c.attention_per_ctx_ns, 0.5)


def test_measured_copy_table_drops_only_the_small_points_the_copy_model_cannot_take():
    from real.profile_hw import consistent_copy_table
    from hardware.profile import TabulatedCopyCost
    # measured on the H100 machine (run 8): 0.25 -> 1 MiB rises faster than latency + bytes/bw allows
    noisy = {0.25: 11.38, 1: 27.72, 4: 43.09, 16: 47.68, 64: 51.28, 256: 51.73}
    with pytest.raises(ValueError, match="rises too fast"):
        TabulatedCopyCost(18.9, tuple((int(m * 2**20), b) for m, b in noisy.items()))
    latency, table = consistent_copy_table(18.94, noisy)
    assert list(table) == [1, 4, 16, 64, 256] and latency <= 18.94
    TabulatedCopyCost(latency, tuple((int(m * 2**20), b) for m, b in table.items()))
    clean = {0.25: 13.54, 1: 30.65, 4: 45.79, 16: 52.48, 64: 53.4, 256: 53.97}
    assert consistent_copy_table(19.36, clean) == (19.34, clean)
    # the latency is capped by the smallest point's whole time
    assert consistent_copy_table(1000.0, clean)[0] < 0.25 * 2**20 / 13.54e3


# -- fuzz: a damaged profile loads correctly or is refused in one HardwareProfileError naming it ------------
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                                  st.integers(-3, 3), max_size=2))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_damaged_profile_loads_correctly_or_names_the_field(data):
    """The committed measured profile, as the YAML layout, with one to three damages anywhere (a field deleted,
    replaced by any JSON value, or a nested entry — copy table, measured compute, per-policy host costs —
    changed): either it loads and every cost it gives is a positive integer number of ns, or one
    HardwareProfileError names the origin; never another exception."""
    import copy as copy_module
    from hardware.profile import hardware_from_dict, hardware_to_dict
    base = hardware_to_dict(load_hardware("h100-pcie5-measured"))
    entry = base["measured_compute"]["moe-lm"]["bf16"]
    entry["decision_us"], entry["layer_extra_us"], entry["copy_wait_us"] = {"OraclePrefetch": 12.5}, {"LRU": 3.0}, 7.0
    profile = copy_module.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3), "damages")):
        where = data.draw(st.sampled_from(["top", "table", "measured", "entry", "host"]), "where")
        if where == "top":
            key = data.draw(st.sampled_from(sorted(base) + ["surprise"]), "key")
            if data.draw(st.booleans(), "delete") and key in profile:
                del profile[key]
            else:
                profile[key] = data.draw(_JUNK, "value")
        elif where == "table" and isinstance(profile.get("h2d_GBps_by_MiB"), dict):
            profile["h2d_GBps_by_MiB"][data.draw(st.sampled_from([0.25, 1, 3, "x", -1, 0]), "mib")] = data.draw(_JUNK, "bw")
        elif where in ("measured", "entry", "host") and isinstance(profile.get("measured_compute"), dict):
            target = profile["measured_compute"].setdefault("moe-lm", {})
            if where == "measured":
                profile["measured_compute"]["moe-lm"] = data.draw(_JUNK, "entry")
                continue
            fields = target.setdefault("bf16", {}) if isinstance(target, dict) else None
            if not isinstance(fields, dict):
                continue
            name = data.draw(st.sampled_from(sorted(entry) + ["typo_us"]), "field")
            if where == "host" and isinstance(fields.get("decision_us"), dict):
                fields["decision_us"][data.draw(st.sampled_from(["LRU", "", "X"]), "policy")] = data.draw(_JUNK, "us")
            elif data.draw(st.booleans(), "delete") and name in fields:
                del fields[name]
            else:
                fields[name] = data.draw(_JUNK, "value")
    try:
        hardware = hardware_from_dict(profile, origin="fuzzed.yaml")
    except HardwareProfileError as err:
        assert str(err).startswith("fuzzed.yaml"), err
        return
    # the measured model's dimensions (its entry records them), cut to 2 layers
    shape = ModelShape("moe-lm", num_layers=2, num_experts=8, top_k=2, hidden_size=1024, expert_intermediate_size=4096,
                       num_attention_heads=16, num_kv_heads=4, head_dim=64, vocab_size=8192)
    cost = hardware.compute_cost(shape, "bf16")
    for ns in (hardware.copy.copy_ns(shape.expert_bytes("bf16")), cost.attention_ns(0), cost.attention_ns(5000),
               cost.expert_ns):
        assert isinstance(ns, int) and ns >= 1
    for ns in (cost.router_ns, cost.layer_overhead_ns, cost.token_overhead_ns, cost.copy_wait_ns):
        assert isinstance(ns, int) and ns >= 0          # a measured zero is a valid measurement


def test_a_profile_that_is_not_utf8_names_the_file(tmp_path):
    """A profile saved in another encoding failed with the codec's bare message, naming no file."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: x\n# caf\xe9\n")
    with pytest.raises(ValueError, match=rf"{path}: not UTF-8 text .* save the profile as UTF-8 YAML"):
        load_hardware(str(path))


def test_measured_times_are_refused_for_a_trace_of_another_model_under_the_same_name(tmp_path, capsys):
    """A measured entry records its model's dimensions: a trace of another model named like it (a renamed
    gpt-oss-20b trace called moe-lm) was timed with the 16-layer, 8-expert model's times without a word."""
    import dataclasses
    from experiments.sweep import main as sweep
    from traces import DEFAULT_TRACE, load_trace, save_trace
    profile = load_hardware("h100-pcie5-measured")
    own = load_trace(REPO / "traces" / "moe-lm-h100.npz").model
    assert profile.measured_shape_error(own, "bf16") is None
    assert profile.compute_cost(own, "bf16").basis == "measured"
    trace = load_trace(DEFAULT_TRACE)
    renamed = dataclasses.replace(trace, meta=dataclasses.replace(
        trace.meta, model=dataclasses.replace(trace.model, name="moe-lm")))
    message = profile.measured_shape_error(renamed.model, "bf16")
    assert "hidden_size 1024/2880" in message and "num_experts 8/32" in message and "own name" in message
    with pytest.raises(HardwareProfileError, match="dimensions differ"):
        profile.compute_cost(renamed.model, "bf16")
    assert profile.measured_shape_error(renamed.model, "int4") is None      # no entry at int4: analytic
    path = tmp_path / "renamed.npz"
    save_trace(renamed, path)
    out = tmp_path / "out"
    assert sweep([f"trace={path}", "hardware=h100-pcie5-measured", "policy=lru", "cache_slots=4", "max_tokens=50",
                  "--out", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "dimensions differ" in err and "Traceback" not in err, err
    assert not (out / "results.csv").exists()


def test_a_measured_entrys_shape_is_read_written_and_checked():
    data = hardware_to_dict(load_hardware("h100-pcie5-measured"))
    entry = data["measured_compute"]["moe-lm"]["bf16"]
    assert entry["shape"]["hidden_size"] == 1024
    assert hardware_to_dict(hardware_from_dict(data, origin="x")) == data        # round trip
    for bad, words in (({"hidden": 3}, "unknown dimension 'hidden'"), ({"hidden_size": 0}, "shape.hidden_size"),
                       ({"hidden_size": 1.5}, "must be an integer")):
        entry["shape"] = bad
        with pytest.raises(HardwareProfileError, match=words):
            hardware_from_dict(data, origin="x")
