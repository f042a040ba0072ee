"""The sweep's front door: key=value parsing, YAML scenarios, and bad input refused with exit code 2."""
import json
from pathlib import Path

import pandas as pd
import pytest

from experiments.config import ConfigError, RunConfig, SweepSpec
from experiments.overrides import build_spec, load_scenario, parse_override
from experiments.sweep import DEFAULT_CONFIG, describe, format_table
from policies.registry import BASELINES
from traces import DEFAULT_TRACE, save_trace, synthetic_trace

from conftest import sweep_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    """top-2 of 8 experts, 4 layers: cache_slots 2..8 are valid."""
    path = tmp_path_factory.mktemp("trace") / "tiny.npz"
    save_trace(synthetic_trace(num_tokens=240, num_layers=4, num_experts=8, top_k=2, num_requests=8, seed=3), path)
    return path


# -- override tokens ---------------------------------------------------------------------------

@pytest.mark.parametrize("token, key, values", [
    ("cache_slots=4..8", "cache_slots", [4, 5, 6, 7, 8]),
    ("cache_slots=6..6", "cache_slots", [6]),
    ("cache_slots=range(4,8)", "cache_slots", [4, 5, 6, 7]),
    ("cache_slots=range(4, 12, 3)", "cache_slots", [4, 7, 10]),
    ("cache_slots=4,6", "cache_slots", [4, 6]),
    ("cache_slots=4..5,7", "cache_slots", [4, 5, 7]),
    ("cache_slots=range(4,6),8..9", "cache_slots", [4, 5, 8, 9]),
    ("cache_slots=5", "cache_slots", [5]),
    ("policy=lru,lfu,belady", "policy", ["lru", "lfu", "belady"]),
    ("policy=my/file.py:Mine", "policy", ["my/file.py:Mine"]),
    ("pcie_GBps=25", "pcie_GBps", [25.0]),
    ("pcie_GBps=1e2", "pcie_GBps", [100.0]),
    ("pcie_GBps=null", "pcie_GBps", [None]),
    ("pcie_GBps=12.5,null", "pcie_GBps", [12.5, None]),
    ("train_fraction=0", "train_fraction", [0.0]),
    ("max_tokens=null", "max_tokens", [None]),
    ("copy_engines=1..2", "copy_engines", [1, 2]),
    ("policy.alpha=0.5", "policy.alpha", [0.5]),
    ("policy.mode=fast,slow", "policy.mode", ["fast", "slow"]),
    ("policy.on=true", "policy.on", [True]),
])
def test_override_values_are_typed_by_field(token, key, values):
    got_key, got = parse_override(token)
    assert got_key == key
    assert got == values
    assert [type(v) for v in got] == [type(v) for v in values]


@pytest.mark.parametrize("token, fragment", [
    ("cache_slots", "expected key=value, got 'cache_slots'"),
    ("=4", "expected key=value"),
    ("cache_slots=", "expected key=value"),
    ("cache_slots=4.5", "cache_slots: expected an integer, got 4.5"),
    ("cache_slots=four", "cache_slots: expected an integer"),
    ("cache_slots=null", "cache_slots: null is not allowed; give an integer"),
    ("train_fraction=null", "train_fraction: null is not allowed; give a number"),
    ("cache_slots=4,8..6", "cache_slots=8..6: empty range"),
    ("cache_slots=8..4", "empty range"),
    ("cache_slots=range(4)", "range(start,stop)"),
    ("cache_slots=range(4,8,0)", "step must not be 0"),
    ("cache_slots=4,,5", "empty item"),
    ("pcie_GBps=fast", "pcie_GBps: expected a number"),
])
def test_malformed_tokens_are_refused_clearly(token, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        parse_override(token)
    assert fragment in str(err.value)


@pytest.mark.parametrize("value", ["{d}/t.npz", "{d}/p.py:Mine"])
def test_a_path_holding_a_comma_says_commas_separate_values_and_how_to_give_it(tmp_path, value):
    folder = tmp_path / "a,b"
    folder.mkdir()
    (folder / "t.npz").write_bytes(b"")
    (folder / "p.py").write_text("")
    key = "policy" if value.endswith(":Mine") else "trace"
    value = value.format(d=folder)
    with pytest.raises(ConfigError) as err:
        parse_override(f"{key}={value}")
    assert str(err.value) == (
        f"{key}={value}: commas separate values, and {tmp_path / 'a'} is no file; {value} as a whole is one: to give "
        f"a path that holds a comma, put it in a YAML scenario, where a string is one value (--config FILE.yaml "
        f'holding the line {key}: "{value}")')
    scenario = tmp_path / "s.yaml"
    scenario.write_text(f'{key}: "{value}"\n')
    assert load_scenario(scenario) == {key: [value]}
    # Paths without a comma, given as a list, stay a list (a missing one is named by the trace check).
    (tmp_path / "one.npz").write_bytes(b"")
    assert parse_override(f"trace={tmp_path / 'one.npz'},{tmp_path / 'two.npz'}")[1] == [
        str(tmp_path / "one.npz"), str(tmp_path / "two.npz")]
    (tmp_path / "mine.py").write_text("")
    assert parse_override(f"policy={tmp_path / 'mine.py'}:Mine,lru")[1] == [f"{tmp_path / 'mine.py'}:Mine", "lru"]


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        parse_override("cache_slot=4")
    message = str(err.value)
    assert "unknown key 'cache_slot'" in message
    for key in ("cache_slots", "policy", "pcie_GBps", "max_tokens", "policy.NAME"):
        assert key in message


# -- scenarios and the grid --------------------------------------------------------------------

def test_yaml_scenario_then_cli_overrides(tmp_path):
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("policy: [lru, belady]\ncache_slots: 4..6\nprecision: fp8\npcie_GBps: 25\n"
                        "policy.alpha: [1, 2]\n")
    loaded = load_scenario(scenario)
    assert loaded == {"policy": ["lru", "belady"], "cache_slots": [4, 5, 6], "precision": ["fp8"],
                      "pcie_GBps": [25.0], "policy.alpha": [1, 2]}
    spec = build_spec(["cache_slots=7,8", "pcie_GBps=null"], scenario)
    d = spec.to_dict()
    assert d["cache_slots"] == [7, 8] and d["pcie_GBps"] == [None] and d["policy"] == ["lru", "belady"]
    assert d["precision"] == ["fp8"]
    grid = spec.grid()
    assert len(grid) == 2 * 2 * 2
    # Policy-major: all of lru's configurations come first.
    assert [c.policy for c in grid] == ["lru"] * 4 + ["belady"] * 4
    assert grid[0] == RunConfig(policy="lru", cache_slots=7, precision="fp8", policy_params=(("alpha", 1),))
    assert grid[1].policy_params == (("alpha", 2),)


def test_scenario_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache_slotz: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'cache_slotz'"):
        load_scenario(bad)
    bad.write_text("cache_slots: [4, [5]]\n")
    with pytest.raises(ConfigError, match="nested"):
        load_scenario(bad)
    with pytest.raises(ConfigError, match="scenario file not found"):
        load_scenario(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="given twice"):
        build_spec(["cache_slots=4", "cache_slots=5"])


def test_default_scenario_is_the_baselines_on_the_sample():
    spec = build_spec([], DEFAULT_CONFIG)
    d = spec.to_dict()
    assert d["policy"] == list(BASELINES)
    assert d["cache_slots"] == [4, 5, 6, 7, 8]
    assert d["hardware"] == ["h100-pcie5"] and d["precision"] == ["bf16"]
    assert all(c.trace == str(DEFAULT_TRACE) for c in spec.grid())


def test_a_scenario_file_leaves_out_keys_that_take_the_command_lines_defaults(tmp_path):
    one = tmp_path / "one.yaml"
    one.write_text("policy: belady\n")
    d = build_spec([], one).to_dict()
    assert d["policy"] == ["belady"] and d["cache_slots"] == [4, 5, 6, 7, 8]      # as `policy=belady` runs
    assert d == build_spec(["policy=belady"], DEFAULT_CONFIG).to_dict()
    assert d["copies_in_flight"] == [2] and d["sim_path"] == ["auto"]     # resolved_config.yaml's spec has them
    assert build_spec(["cache_slots=4"], tmp_path / "one.yaml").to_dict()["policy"] == ["belady"]
    for text in ("", "# nothing\n", "{}\n"):       # an empty file is refused, not run as one lru@4
        one.write_text(text)
        with pytest.raises(ConfigError, match=r"one.yaml: an empty scenario; give at least one key"):
            build_spec([], one)


def test_a_scenario_that_is_not_utf8_names_the_file(tmp_path):
    """A scenario saved in another encoding failed with the codec's bare message, naming no file."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"policy: lru\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"{path}: not UTF-8 text .* save the scenario as UTF-8 YAML"):
        build_spec([], path)


def test_repeated_values_do_not_repeat_configurations():
    spec = SweepSpec.from_mapping({"cache_slots": [4, 4, 5], "policy": ["lru"]})
    assert [c.cache_slots for c in spec.grid()] == [4, 5]


# -- bad input through the CLI -----------------------------------------------------------------

def _refused(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_cli_refuses_cache_slots_below_top_k_per_layer_not_in_a_pool_that_holds_them(trace_path, tmp_path):
    r = sweep_cli(f"trace={trace_path}", "policy=lru", "cache_slots=1..3", "--out", tmp_path / "out")
    _refused(r, "cache_slots=1", "top_k=2", "use cache_slots >= 2")
    assert not (tmp_path / "out").exists()      # nothing ran
    # in global mode the shared pool (cache_slots x layers) must hold a layer's top-k: 1 x L layers does
    r = sweep_cli(f"trace={trace_path}", "policy=lru,belady", "cache_mode=global", "cache_slots=1", "--out",
                  tmp_path / "global")
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / "global" / "results.csv")
    assert len(table) == 2 and table["cache_slots"].eq(1).all() and table["hit_rate"].between(0, 1).all()


@pytest.mark.parametrize("mode, fix", [("per_layer", "use cache_slots >= 2"), ("global", "use cache_slots >= 1")])
def test_cache_slots_zero_names_the_traces_top_k_as_any_count_below_it(trace_path, tmp_path, mode, fix):
    from experiments.runner import validate_grid
    with pytest.raises(ConfigError) as err:
        validate_grid([RunConfig(trace=str(trace_path), cache_slots=0, cache_mode=mode)])
    assert str(err.value).startswith("model synthetic-L4-E8-k2: cache_slots=0 ") and str(err.value).endswith(fix), err.value
    # A trace that does not load says so once the settings pass: until then, the settings' own bound.
    with pytest.raises(ConfigError, match=r"^cache_slots=0 is out of range; use a value >= 1$"):
        validate_grid([RunConfig(trace=str(tmp_path / "missing.npz"), cache_slots=0, cache_mode=mode)])


def test_cli_refuses_cache_slots_above_experts(trace_path, tmp_path):
    r = sweep_cli(f"trace={trace_path}", "cache_slots=9", "--out", tmp_path / "out")
    _refused(r, "cache_slots=9", "use cache_slots <= 8")


def test_cli_refuses_unknown_policy(trace_path, tmp_path):
    r = sweep_cli(f"trace={trace_path}", "policy=lru,lruu", "--out", tmp_path / "out")
    _refused(r, "unknown policy 'lruu'", "belady", "FILE.py:Class")


def test_cli_refuses_truncated_trace(trace_path, tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(trace_path.read_bytes()[:300])
    r = sweep_cli(f"trace={broken}", "--out", tmp_path / "out")
    _refused(r, str(broken), "truncated or corrupt")
    r = sweep_cli(f"trace={tmp_path / 'nope.npz'}", "--out", tmp_path / "out")
    _refused(r, "nope.npz", "no such trace file")


def test_cli_refuses_unknown_key_and_hardware(trace_path, tmp_path):
    r = sweep_cli(f"trace={trace_path}", "cache_size=4", "--out", tmp_path / "out")
    _refused(r, "unknown key 'cache_size'", "cache_slots")
    r = sweep_cli(f"trace={trace_path}", "hardware=tpu-v9", "--out", tmp_path / "out")
    _refused(r, "unknown hardware profile 'tpu-v9'", "h100-pcie5")
    r = sweep_cli(f"trace={trace_path}", "precision=fp7", "--out", tmp_path / "out")
    _refused(r, "unknown precision 'fp7'", "bf16")
    r = sweep_cli(f"trace={trace_path}", "cache_slots", "--out", tmp_path / "out")
    _refused(r, "expected key=value, got 'cache_slots'")


def test_a_profile_measuring_another_model_is_named_and_the_rows_say_which_compute_ran(trace_path, tmp_path):
    """A typo in a profile's measured_compute model name used to fall back to the analytic model without a
    word: the sweep prints a note, and every row has compute_basis."""
    import dataclasses
    import yaml
    from hardware.profile import hardware_to_dict, load_hardware
    from tests.test_hardware import _measured
    profile = dataclasses.replace(load_hardware("h100-pcie5"), name="typo",
                                  measured_compute=(("synthetik", _measured(precision="bf16")),))
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(hardware_to_dict(profile)))
    out = tmp_path / "out"
    r = sweep_cli(f"trace={trace_path}", f"hardware={path}", "policy=lru", "cache_slots=4", "--out", out, "--no-plots")
    assert r.returncode == 0, r.stderr
    assert "note: hardware typo measures compute for synthetik at bf16, not for synthetic-L4-E8-k2 at bf16" in r.stdout
    assert pd.read_csv(out / "results.csv")["compute_basis"].tolist() == ["analytic"]


def test_figures_of_an_earlier_call_are_not_left_beside_new_tables(trace_path, tmp_path):
    out = tmp_path / "out"
    assert sweep_cli(f"trace={trace_path}", "policy=lru", "cache_slots=2,3", "--out", out, "--timeline").returncode == 0
    assert all((out / f).is_file() for f in ("tokens_vs_slots.png", "timeline.json"))
    r = sweep_cli(f"trace={trace_path}", "policy=fifo", "cache_slots=4", "--out", out, "--no-plots")
    assert r.returncode == 0
    assert ("removed tokens_vs_slots.png, an earlier call's: drawn from another results.csv than this call's "
            "(to draw it for this table: the same command without --no-plots)") in r.stdout
    assert ("removed timeline.json, an earlier call's: drawn from a configuration's row that is not in this call's "
            "results.csv (to draw it for this table: the same command with --timeline)") in r.stdout
    assert not any((out / f).exists() for f in ("tokens_vs_slots.png", "hit_rate_vs_belady.png", "timeline.json",
                                                "timeline.png"))


def _sweep_here(trace_path, out, *tokens):
    from experiments.sweep import main
    return main([f"trace={trace_path}", "policy=lru,fifo", "max_tokens=100", *tokens, "--out", out, "--workers", "1"])


def test_a_resumed_call_without_figures_keeps_those_that_still_show_its_table(trace_path, tmp_path, capsys):
    """--no-plots over a folder whose figures were drawn from the same table used to delete them: kept, said so;
    the timeline is kept while its configuration's row is in the table."""
    out = tmp_path / "out"
    assert _sweep_here(trace_path, out, "cache_slots=2,3", "--timeline") == 0
    figures = {f: (out / f).read_bytes() for f in ("tokens_vs_slots.png", "hit_rate_vs_belady.png", "timeline.json",
                                                   "timeline.png")}
    capsys.readouterr()
    assert _sweep_here(trace_path, out, "cache_slots=2,3", "--no-plots") == 0
    stdout = capsys.readouterr().out
    assert "removed" not in stdout
    assert ("(kept from an earlier call, still this table's: tokens_vs_slots.png, hit_rate_vs_belady.png, "
            "timeline.json, timeline.png)") in stdout
    assert {f: (out / f).read_bytes() for f in figures} == figures
    # A grid that keeps the timeline's configuration (the first, lru at 2 slots) but not the table.
    assert _sweep_here(trace_path, out, "cache_slots=2", "--no-plots") == 0
    stdout = capsys.readouterr().out
    assert "removed tokens_vs_slots.png, an earlier call's: drawn from another results.csv" in stdout
    assert "(kept from an earlier call, still this table's: timeline.json, timeline.png)" in stdout
    assert (out / "timeline.json").read_bytes() == figures["timeline.json"]
    assert not (out / "tokens_vs_slots.png").exists()


@pytest.mark.parametrize("damage, why", [
    (lambda out: (out / "figures.json").unlink(), "no record of what it was drawn from"),
    (lambda out: (out / "tokens_vs_slots.png").write_bytes(b"another figure"), "the file changed since it was drawn"),
])
def test_a_figure_that_cannot_be_shown_to_be_of_this_table_is_removed(trace_path, tmp_path, capsys, damage, why):
    out = tmp_path / "out"
    assert _sweep_here(trace_path, out, "cache_slots=2") == 0
    damage(out)
    capsys.readouterr()
    assert _sweep_here(trace_path, out, "cache_slots=2", "--no-plots") == 0
    assert f"removed tokens_vs_slots.png, an earlier call's: {why}" in capsys.readouterr().out
    assert not (out / "tokens_vs_slots.png").exists()


def test_figures_drawn_from_the_same_rows_in_another_order_are_kept(trace_path, tmp_path, capsys):
    """The grid given in another order writes the same rows in another order: the figures drawn from them still
    show this table, and a later --no-plots call removed them."""
    from experiments.sweep import main
    out = tmp_path / "out"

    def sweep(policies, *more):
        return main([f"trace={trace_path}", f"policy={policies}", "max_tokens=100", "cache_slots=2,3", *more,
                     "--out", out, "--workers", "1"])
    assert sweep("lru,fifo") == 0
    figures = {f: (out / f).read_bytes() for f in ("tokens_vs_slots.png", "hit_rate_vs_belady.png")}
    before = (out / "results.csv").read_text()
    capsys.readouterr()
    assert sweep("fifo,lru", "--no-plots") == 0
    stdout = capsys.readouterr().out
    after = (out / "results.csv").read_text()
    assert after != before and sorted(after.splitlines()) == sorted(before.splitlines())
    assert "removed" not in stdout and "still this table's: tokens_vs_slots.png, hit_rate_vs_belady.png" in stdout
    assert {f: (out / f).read_bytes() for f in figures} == figures


@pytest.mark.parametrize("record, problem", [("{not json", "not a readable JSON record (JSONDecodeError: "),
                                             ("[1, 2]", "holds a JSON list, not an object of figure names")])
def test_a_damaged_figure_record_is_named_in_one_line(trace_path, tmp_path, capsys, record, problem):
    """A damaged figures.json was read as no record at all: the figures it had vouched for were removed as if an
    older sweep's, and the damage went unsaid. It is named, each figure removed says why, and a fresh record
    replaces it."""
    out = tmp_path / "out"
    assert _sweep_here(trace_path, out, "cache_slots=2") == 0
    (out / "figures.json").write_text(record)
    capsys.readouterr()
    assert _sweep_here(trace_path, out, "cache_slots=2", "--no-plots") == 0
    stdout = capsys.readouterr().out
    (line,) = [x for x in stdout.splitlines() if x.startswith("damaged: ")]
    assert line.startswith(f"damaged: {out / 'figures.json'}: {problem}"), line
    assert line.endswith("it vouches for no earlier figure (each removed is named below), and this call's record "
                         "replaces it"), line
    assert "removed tokens_vs_slots.png, an earlier call's: its record in figures.json is damaged" in stdout
    assert json.loads((out / "figures.json").read_text()) == {}


# -- a user's own policy -----------------------------------------------------------------------

def test_user_policy_file_runs_in_the_sweep(trace_path, tmp_path):
    policy_file = tmp_path / "my_policy.py"
    policy_file.write_text("from policies.lru import LRU\n\n\nclass MyLRU(LRU):\n    pass\n\n\n"
                           "class Broken(LRU):\n    def on_access(self, access, index, key, hit):\n"
                           "        raise RuntimeError('broken on purpose')\n")
    mine = f"{policy_file}:MyLRU"
    out = tmp_path / "out"
    r = sweep_cli(f"trace={trace_path}", f"policy=lru,{mine}", "cache_slots=2,3", "--out", out,
                  "--workers", "2", "--no-plots")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out / "results.csv")
    assert list(df["policy"]) == ["lru", "lru", mine, mine]
    # A subclass that changes nothing must behave exactly as LRU.
    assert list(df["hits"][:2]) == list(df["hits"][2:])
    assert mine in r.stdout

    # A policy that fails at run time is reported by name; the other rows are still written. (One whose
    # constructor raises is refused before anything runs: tests/test_sweep_user_policies.py.)
    broken = f"{policy_file}:Broken"
    r = sweep_cli(f"trace={trace_path}", f"policy=fifo,{broken}", "cache_slots=2,3", "--out", out,
                  "--workers", "2", "--no-plots")
    assert r.returncode == 1
    assert "broken on purpose" in r.stderr and f"policy={broken} cache_slots=2" in r.stderr
    assert "2 of 4 configurations failed" in r.stderr
    df = pd.read_csv(out / "results.csv")
    assert list(df["policy"]) == ["fifo", "fifo"]


def test_table_has_policy_rows_and_slot_columns():
    df = pd.DataFrame({
        "policy": ["lru", "lru", "belady", "belady"], "cache_slots": [4, 5, 4, 5], "cache_mode": ["per_layer"] * 4,
        "policy_params": ["{}"] * 4, "tokens_per_s": [19.04, 20.8, 19.04, 24.4],
        "hit_rate": [0.4231, 0.475, 0.4231, 0.557], "belady_hit_fraction": [1.0, 0.853, 1.0, 1.0],
    })
    lines = format_table(df, ["policy", "cache_slots"]).splitlines()
    assert "slots=4" in lines[0] and "slots=5" in lines[0] and "tok/s | hit | %Belady" in lines[1]
    assert lines[3].split() == ["lru", "19.0", "|", "0.423", "|", "100%", "20.8", "|", "0.475", "|", "85%"]
    assert lines[4].startswith("belady")
    assert lines[-1] == "slots = expert slots per MoE layer"
    params = format_table(df.assign(policy_params=['{"a": 1}', '{"a": 1}', '{"a": 2}', '{"a": 2}']),
                          ["policy", "cache_slots", "policy.a"])
    assert "lru policy.a=1 " in params and "belady policy.a=2 " in params
    # A parameter given one value still changes the policy: its row says so.
    one = format_table(df.assign(policy_params='{"cross_tokens": false}'), ["policy", "cache_slots"]).splitlines()
    assert one[3].startswith("lru policy.cross_tokens=false ") and one[4].startswith("belady policy.cross_tokens=false ")

    # A varied key whose values include null (the ideal link) reads as on the command line, not nan / 2.0.
    window = format_table(df.assign(copies_in_flight=[None, None, 2, 2]), ["policy", "cache_slots", "copies_in_flight"])
    assert "lru copies_in_flight=null " in window and "belady copies_in_flight=2 " in window and "nan" not in window

    # In global mode the count is still per layer, but the slots are one pool: the table says so.
    shared = format_table(df.assign(cache_mode="global"), ["policy", "cache_slots"]).splitlines()
    assert "shared globally" in shared[-1] and "per MoE layer" not in shared[-1]
    both = format_table(df.assign(cache_mode=["per_layer", "per_layer", "global", "global"]),
                        ["policy", "cache_slots", "cache_mode"]).splitlines()
    assert "(cache_mode=per_layer)" in both[-1] and "shared globally" in both[-1] and "(cache_mode=global)" in both[-1]

    # A lossy policy (it ran other experts: replaced > 0) is named so, and a line says what its hits count.
    lossy = format_table(df.assign(replaced=[0, 0, 3, 0]), ["policy", "cache_slots"]).splitlines()
    assert lossy[3].startswith("lru ") and "(lossy)" not in lossy[3] and lossy[4].startswith("belady (lossy) ")
    assert lossy[-1].startswith("(lossy): the policy ran other experts")


def test_figure_axis_says_what_a_slot_count_means():
    from plots.figures import _slots_label
    per_layer, shared = pd.DataFrame({"cache_mode": ["per_layer"]}), pd.DataFrame({"cache_mode": ["global"]})
    assert _slots_label(per_layer) == "cache slots per layer"
    assert "shared globally" in _slots_label(shared)
    assert "global" in _slots_label(pd.concat([per_layer, shared]))


def test_a_configuration_is_described_with_the_parameters_given_to_its_policy():
    cfg = RunConfig(policy="oracle", cache_slots=5, policy_params=(("cross_tokens", False), ("depth", None)))
    assert describe(cfg, []) == "policy=oracle policy.cross_tokens=false policy.depth=null cache_slots=5"
    assert describe(RunConfig(policy="lru", cache_slots=4, pcie_GBps=25.0), ["policy", "pcie_GBps"]) == \
        "policy=lru cache_slots=4 pcie_GBps=25.0"


def test_a_prefetching_policy_without_a_measured_decision_time_is_named(tmp_path):
    """A profile's decision_us is keyed by class name: a user's subclass of a measured policy (or a renamed one)
    would be charged no host decision time without a word. On-demand policies and LRU, the calibration's
    baseline, are not named."""
    from experiments.runner import compute_notes
    mine = tmp_path / "mine.py"
    mine.write_text("from policies.oracle_prefetch import OraclePrefetch\n\n\nclass MyOracle(OraclePrefetch):\n    pass\n")
    profile = REPO / "experiments" / "results" / "h200" / "validation" / "h200-measured.yaml"
    grid = [RunConfig(policy=p, trace=str(REPO / "traces" / "moe-lm-h100.npz"), hardware=str(profile), cache_slots=4)
            for p in ("lru", "fifo", "oracle", f"{mine}:MyOracle")]
    [note] = compute_notes(grid)
    assert "decision time per layer of" in note and "OraclePrefetch" in note and "not of MyOracle" in note


def test_a_path_under_the_home_folder_may_be_given_with_a_tilde(trace_path, tmp_path, monkeypatch):
    """zsh and sh leave trace=~/t.npz unexpanded (a shell expands ~ at a word's start), and so does a YAML
    scenario: the sweep said there was no such trace file. No shell expands --out=~/o: the sweep made a folder
    named ~ in the current one."""
    import shutil
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(trace_path, tmp_path / "t.npz")
    (tmp_path / "mine.py").write_text("from policies.lru import LRU\n\n\nclass Mine(LRU):\n    pass\n")
    (tmp_path / "s.yaml").write_text("trace: ~/t.npz\n")
    spec = build_spec(["policy=~/mine.py:Mine,lru", "hardware=h100-pcie5"], tmp_path / "s.yaml")
    assert spec.to_dict()["trace"] == [str(tmp_path / "t.npz")]
    assert spec.to_dict()["policy"] == [f"{tmp_path / 'mine.py'}:Mine", "lru"]
    from experiments.sweep import main
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["trace=~/t.npz", "policy=~/mine.py:Mine", "cache_slots=2", "max_tokens=50", "--out=~/o",
                 "--config=~/s.yaml", "--no-plots", "--workers", "1"]) == 0
    assert (tmp_path / "o" / "results.csv").is_file() and not (work / "~").exists()
