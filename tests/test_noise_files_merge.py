"""An engine command's noise files (OUT/noise_runs.csv, noise_floor.csv, noise_sessions.json) keep the rows of an
earlier call into the same OUT as engine.csv does: a row is replaced only by its configuration measured again
under the same settings. On the CPU with a tiny synthetic trace (``engine_bench replay``)."""
from __future__ import annotations

import json

import pandas as pd
from conftest import cpu_replay as replay

SESSION = "replay-synthetic-L2-E4-k2"




def keys(frame: pd.DataFrame) -> list[list]:
    return frame.assign(max_tokens=[json.loads(s)["max_tokens"] for s in frame["settings"]])[
        ["cache_slots", "max_tokens"]].values.tolist()


def test_a_later_call_keeps_the_noise_rows_of_other_settings_and_configurations(tmp_path, tiny_replay_trace):
    out = tmp_path / "out"
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2,3")
    first = pd.read_csv(out / "noise_runs.csv")
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2", "--max-tokens", "3")    # other settings: beside
    runs, floor = pd.read_csv(out / "noise_runs.csv"), pd.read_csv(out / "noise_floor.csv")
    assert keys(runs) == [[2, 4], [3, 4], [2, 3]] and keys(floor) == [[2, 4], [3, 4], [2, 3]]
    assert set(runs["session"]) == {SESSION} and runs["steps"].tolist() == [4, 4, 3]
    assert runs["tokens_per_s"].iloc[:2].tolist() == first["tokens_per_s"].tolist()     # kept as measured
    assert set(first.columns) <= set(runs.columns) and {"settings", "engine_code"} <= set(runs.columns)
    engine = pd.read_csv(out / "engine.csv")       # the same rows as engine.csv's, told apart the same way
    assert engine["settings"].tolist() == floor["settings"].tolist()
    # the same settings again, forced: that configuration's rows are replaced, the others stay
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "3", "--fresh")
    runs, floor = pd.read_csv(out / "noise_runs.csv"), pd.read_csv(out / "noise_floor.csv")
    assert keys(runs) == [[2, 4], [2, 3], [3, 4]] and keys(floor) == [[2, 4], [2, 3], [3, 4]]
    assert runs["tokens_per_s"].iloc[0] == first["tokens_per_s"].iloc[0]
    from experiments.noise import print_report         # the noise command's report still reads the session
    print_report(out)


def test_legacy_rows_and_other_sessions_stay_and_a_resumed_call_keeps_its_warm_ups(tmp_path, tiny_replay_trace):
    out = tmp_path / "out"
    out.mkdir()
    legacy = pd.DataFrame([{"session": SESSION, "config": "mode=shape-replay policy=lru cache_slots=2",
                            "cache_slots": 2, "round": 0, "tokens_per_s": 1.0}])       # written before rows carried their settings
    legacy.to_csv(out / "noise_runs.csv", index=False)
    (out / "noise_sessions.json").write_text(json.dumps({"before": {"settings": {}, "warmups": {}}}))
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2", "--repeats", "2", "--warmup-tokens", "2")
    runs = pd.read_csv(out / "noise_runs.csv")
    assert runs["tokens_per_s"].iloc[0] == 1.0 and len(runs) == 3 and pd.isna(runs["settings"].iloc[0])
    # resumed: cache_slots=2 is skipped; its runs and its warm-up stay beside cache_slots=3's
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2,3", "--repeats", "2", "--warmup-tokens", "2")
    runs = pd.read_csv(out / "noise_runs.csv")
    assert runs["cache_slots"].tolist() == [2, 2, 2, 3, 3]
    sessions = json.loads((out / "noise_sessions.json").read_text())
    assert set(sessions) == {"before", SESSION}
    assert sorted(sessions[SESSION]["warmups"]) == ["mode=shape-replay policy=lru cache_slots=2",
                                                    "mode=shape-replay policy=lru cache_slots=3"]
    assert sessions[SESSION]["resumed"] == ["mode=shape-replay policy=lru cache_slots=2"]
