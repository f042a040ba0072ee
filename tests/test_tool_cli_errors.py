"""The engine and trace tools refuse bad arguments and files with one line naming the argument and the fix,
exit code 2, no traceback, before any expensive work (and before anything is written): ``experiments.record``,
``references``, ``engine_bench live``, ``profile``, ``measure_policies``, ``train_gate``, ``make_tracks``,
``bench_sim`` and ``traces.import_gpt_oss``. CPU only, a
2-layer random checkpoint with a small tokenizer, synthetic traces."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from real.checkpoint import save_checkpoint
from real.corpus import DOMAIN_FILES, save_tokenizer, train_tokenizer
from real.shape_model import shape_config
from conftest import mixtral_config, refused
from traces import ModelShape, save_trace, synthetic_trace

SHAPE = ModelShape("tiny-cli", num_layers=2, num_experts=4, top_k=2, hidden_size=16, expert_intermediate_size=16,
                   num_attention_heads=2, num_kv_heads=1, head_dim=8, vocab_size=300)
HF_CONFIG = mixtral_config(SHAPE, max_position_embeddings=256)
CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Checkpoint folders (good, empty, bad JSON, no tokenizer, no weights), a tiny corpus, and traces."""
    root = tmp_path_factory.mktemp("cli")
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=g) * 0.3 for n, s in shape_config(SHAPE, 64).expected_shapes().items()}
    good = root / "ckpt"
    save_checkpoint(HF_CONFIG, tensors, good)
    save_tokenizer(train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300), good, 64)
    (root / "empty").mkdir()
    (root / "badjson").mkdir()
    (root / "badjson" / "config.json").write_text('{"model_type": "mixtral",')
    shutil.copytree(good, root / "notok")
    for f in (root / "notok").glob("*token*"):
        f.unlink()
    shutil.copytree(good, root / "noweights")
    (root / "noweights" / "model.safetensors").unlink()
    corpus = root / "corpus"
    corpus.mkdir()
    for files in DOMAIN_FILES.values():
        for name in files:
            (corpus / name).write_text("".join(f"the quick brown fox {i} jumps over the lazy dog.\n" for i in range(400)))
    (root / "flat-corpus").mkdir()     # one line per file: the held-out split is empty
    for files in DOMAIN_FILES.values():
        for name in files:
            (root / "flat-corpus" / name).write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (root / "short-corpus").mkdir()    # a held-out split of a few dozen tokens
    for files in DOMAIN_FILES.values():
        for name in files:
            (root / "short-corpus" / name).write_text("".join(f"the quick brown fox {i} jumps.\n" for i in range(40)))
    # a recording of the checkpoint's shape with hidden states at every step (values need not be real here)
    base = synthetic_trace(num_tokens=12, num_layers=2, num_experts=4, top_k=2, num_requests=2, seed=1)
    recorded = dataclasses.replace(
        base, meta=dataclasses.replace(base.meta, model=SHAPE),
        hidden_states=np.random.default_rng(0).standard_normal((12, 2, 16)).astype(np.float16),
        hidden_token_index=np.arange(12))
    save_trace(recorded, root / "recorded.npz")
    save_trace(base, root / "bare.npz")
    (root / "truncated.npz").write_bytes((root / "recorded.npz").read_bytes()[:300])
    (root / "a-file").write_text("not a folder")
    return root


# -- record, references, engine_bench live: the checkpoint is checked first ----------------------------
MODEL_CASES = {"empty": ["config.json: missing", "save_pretrained"],
               "badjson": ["config.json: not valid JSON", "re-save the config"],
               "notok": ["no tokenizer loads from it", "tokenizer.save_pretrained"],
               "noweights": ["neither model.safetensors nor", "save_pretrained(safe_serialization=True)"]}


@pytest.mark.parametrize("folder", ["empty", "badjson", "notok", "noweights"])
def test_record_checks_the_checkpoint_first(world, tmp_path, capsys, folder):
    from experiments import record
    words = MODEL_CASES[folder]
    out = tmp_path / "out"
    refused(capsys, lambda: record.main(["--model", str(world / folder), "--out", str(out), "--corpus",
                                         str(world / "corpus"), *CPU]), "--model", str(world / folder), *words)
    assert not out.exists()         # nothing written


def test_record_refuses_an_out_below_a_file(world, capsys):
    from experiments import record
    out = world / "a-file" / "out"
    refused(capsys, lambda: record.main(["--model", str(world / "ckpt"), "--out", str(out), "--corpus",
                                         str(world / "corpus"), *CPU]), "--out", "is a file, not a folder")


def test_record_names_a_corpus_that_lacks_files(world, tmp_path, capsys):
    from experiments import record
    refused(capsys, lambda: record.main(["--model", str(world / "ckpt"), "--out", str(tmp_path / "out"),
                                         "--corpus", str(tmp_path), *CPU]), "lacks", "--corpus")


@pytest.mark.parametrize("folder", ["empty", "badjson", "noweights"])
def test_references_checks_the_checkpoint_first(world, tmp_path, capsys, folder):
    from experiments import references
    words = MODEL_CASES[folder]
    out = tmp_path / "out"
    refused(capsys, lambda: references.main(["--model", str(world / folder), "--out", str(out), "--corpus",
                                             str(world / "corpus"), *CPU]), "--model", *words)
    assert not out.exists()


@pytest.mark.parametrize("folder", ["empty", "badjson", "notok"])
def test_engine_bench_live_checks_the_checkpoint_first(world, tmp_path, capsys, folder):
    from experiments.engine_bench import main as bench
    words = MODEL_CASES[folder]
    out = tmp_path / "out"
    refused(capsys, lambda: bench(["live", "--model", str(world / folder), "--out", str(out), "--corpus",
                                   str(world / "corpus"), *CPU]), "--model", *words)
    assert not out.exists()


@pytest.mark.parametrize("command", ["profile", "measure_policies", "train_gate"])
@pytest.mark.parametrize("folder", ["empty", "badjson", "noweights"])
def test_the_other_model_commands_check_the_config_and_out_first(world, tmp_path, capsys, command, folder):
    """profile, measure_policies and train_gate read the checkpoint's config.json through the same check (it was
    an unguarded read in each), and refuse an --out below a file, before anything loads."""
    import importlib
    if (command, folder) == ("measure_policies", "noweights"):
        pytest.skip("measure_policies checks its recording (which this fixture lacks) before the weights load")
    main = importlib.import_module(f"experiments.{command}").main
    extra = {"profile": CPU,
             "measure_policies": ["--trace", str(world / "recorded.npz"), "--train-trace", str(world / "recorded.npz"),
                                  "--corpus", str(world / "corpus"), "--slots", "2", "--policies", "lru", *CPU],
             "train_gate": ["--trace", str(world / "recorded.npz"), "--device", "cpu", "--depth", "1"]}[command]
    out = tmp_path / "out"
    refused(capsys, lambda: main(["--model", str(world / folder), "--out", str(out), *extra]), "--model",
            *MODEL_CASES[folder])
    if folder != "noweights":       # (missing weights are found when they load, after the folder is made)
        assert not out.exists()
    refused(capsys, lambda: main(["--model", str(world / "ckpt"), "--out", str(world / "a-file" / "out"), *extra]),
            "--out", "is a file, not a folder")


def test_engine_bench_refuses_an_out_that_is_a_file(world, capsys):
    from experiments.engine_bench import main as bench
    refused(capsys, lambda: bench(["replay", "--trace", str(Path(__file__).parent / "data" / "tiny-moe-trace.npz"),
                                   "--out", str(world / "a-file"), "--slots", "2", "--policies", "lru", *CPU]),
            "--out", "is a file, not a folder")


@pytest.mark.parametrize("option, value, words", [("--slots", "2,3,2", "2 given more than once"),
                                                  ("--policies", "lru,belady,lru", "lru given more than once")])
def test_engine_bench_refuses_a_configuration_given_twice(world, capsys, tmp_path, option, value, words):
    """A repeat would be the same configuration twice, which the measurement refuses only after the model is built."""
    from experiments.engine_bench import main as bench
    args = {"--slots": "2", "--policies": "lru", option: value}
    refused(capsys, lambda: bench(["replay", "--trace", str(Path(__file__).parent / "data" / "tiny-moe-trace.npz"),
                                   "--out", str(tmp_path / "o"), *(x for kv in args.items() for x in kv), *CPU]),
            option, words)


# -- make_tracks ------------------------------------------------------------------------------------------
def _tracks(world, tmp_path, *extra, trace="recorded.npz", model="ckpt"):
    from experiments import make_tracks
    argv = ["--trace", str(world / trace), "--model", str(world / model), "--out", str(tmp_path / "t.npz"),
            "--depth", "1", *CPU, *extra]
    return lambda: make_tracks.main(argv)


@pytest.mark.parametrize("extra, kwargs, words", [
    ((), {"trace": "bare.npz"}, ["--trace", "hidden_states: none recorded", "experiments.record"]),
    ((), {"trace": "truncated.npz"}, ["--trace", "truncated or corrupt", "re-export"]),
    ((), {"model": "nope"}, ["--model", "no such folder"]),
    ((), {"model": "empty"}, ["--model", "config.json: missing"]),
    (("--gate", "/nope"), {}, ["--gate", "no such folder"]),
    (("--device", "gpu"), {}, ["--device", "invalid choice: 'gpu'"]),
    (("--dtype", "float8"), {}, ["--dtype", "invalid choice: 'float8'"]),
    (("--train-tokens", "-5"), {}, ["--train-tokens", "-5: must be at least 0"]),
    (("--depth", "99"), {}, ["--depth 99", "2 layers", "use --depth 1..1"]),
    (("--depth", "2"), {}, ["--depth 2", "use --depth 1..1"]),
    (("--depth", "0"), {}, ["--depth", "must be at least 1"]),
    (("--affinity-trace", "/nope.npz"), {}, ["--affinity-trace", "no such file"]),
    (("--train-tokens", "5", "--corpus", "/nope"), {}, ["--corpus /nope", "no such folder"]),
])
def test_make_tracks_refuses_bad_arguments_before_loading_the_model(world, tmp_path, capsys, extra, kwargs, words):
    refused(capsys, _tracks(world, tmp_path, *extra, **kwargs), *words)
    assert not (tmp_path / "t.npz").exists()


def test_make_tracks_refuses_outputs_it_cannot_write(world, tmp_path, capsys):
    from experiments import make_tracks
    base = ["--trace", str(world / "recorded.npz"), "--model", str(world / "ckpt"), "--depth", "1", *CPU]
    refused(capsys, lambda: make_tracks.main([*base, "--out", str(tmp_path)]), "--out", "is a folder")
    refused(capsys, lambda: make_tracks.main([*base, "--out", str(world / "a-file" / "t.npz")]),
            "--out", "is a file, not a folder")
    refused(capsys, lambda: make_tracks.main([*base, "--out", str(tmp_path / "t.npz"), "--recall-csv",
                                              str(tmp_path)]), "--recall-csv", "is a folder")


def test_make_tracks_names_a_gate_folder_without_a_gate_and_the_weights(world, tmp_path, capsys):
    refused(capsys, _tracks(world, tmp_path, "--gate", str(tmp_path)), "--gate", "missing", "train_gate")
    refused(capsys, _tracks(world, tmp_path, model="noweights"), "--model", "neither model.safetensors")


def test_make_tracks_runs_at_the_largest_depth(world, tmp_path, capsys):
    from traces import load_trace
    _tracks(world, tmp_path)()
    traced = load_trace(tmp_path / "t.npz")
    assert traced.predictions["pregate"].shape == (12, 2, 1, 4)
    assert "nan" not in capsys.readouterr().out.lower()


# -- bench_sim ------------------------------------------------------------------------------------------
@pytest.fixture
def bench_sim(monkeypatch):
    """bench_sim's main with no benchmark cases (the checks and --profile only)."""
    from experiments import bench_sim as module
    monkeypatch.setattr(module, "CASES", [])
    monkeypatch.setattr(module, "PREDICTIVE_TRACE", Path("/nonexistent"))
    monkeypatch.setattr(module, "_fast_cold_start", lambda *args: None)
    return module.main


@pytest.mark.parametrize("args, words", [
    (["--profile", "lru:1"], ["--profile lru:1", "smaller than top_k=2", "cache_slots >= 2"]),
    (["--profile", "lru:0"], ["--profile lru:0", "cache_slots=0 is smaller than top_k=2", "cache_slots >= 2"]),
    (["--profile", "lru:100"], ["--profile lru:100", "exceeds the 4 experts", "cache_slots <= 4"]),
    (["--profile", "lru"], ["--profile lru", "give POLICY:SLOTS"]),
    (["--profile", "nope:2"], ["--profile nope:2", "unknown policy 'nope'"]),
    (["--repeat", "0"], ["--repeat 0", "at least 1"]),
    (["--repeat", "-1"], ["--repeat -1", "at least 1"]),
])
def test_bench_sim_refuses_bad_arguments_in_one_line(bench_sim, tmp_path, capsys, args, words):
    trace = tmp_path / "t.npz"
    save_trace(synthetic_trace(num_tokens=16, num_layers=2, num_experts=4, top_k=2, num_requests=4, seed=1), trace)
    line = refused(capsys, lambda: bench_sim(["--trace", str(trace), *args]), *words)
    assert line.startswith("error: ")


def test_bench_sim_profiles_a_policy_file_of_ones_own(bench_sim, tmp_path, capsys):
    """POLICY:SLOTS split on the last colon: FILE.py:Class:SLOTS, as the sweep's policy=FILE.py:Class."""
    trace = tmp_path / "t.npz"
    save_trace(synthetic_trace(num_tokens=16, num_layers=2, num_experts=4, top_k=2, num_requests=4, seed=1), trace)
    policy = tmp_path / "my_policy.py"
    policy.write_text("from policies.lru import LRU\n\n\nclass MyPolicy(LRU):\n    pass\n")
    bench_sim(["--trace", str(trace), "--repeat", "1", "--profile", f"{policy}:MyPolicy:3"])
    assert "time by file, profiled" in capsys.readouterr().out
    refused(capsys, lambda: bench_sim(["--trace", str(trace), "--profile", f"{policy}:MyPolicy:1"]),
            f"--profile {policy}:MyPolicy:1", "cache_slots >= 2")


# -- traces.import_gpt_oss ------------------------------------------------------------------------------
def test_import_gpt_oss_refuses_outputs_it_cannot_write_and_repeated_generations(world, tmp_path, capsys):
    from traces.import_gpt_oss import main as import_main
    src = tmp_path / "src.npz"
    np.savez(src, gen_start=np.arange(4, dtype=np.int64))
    base = ["--src", str(src), "--sample-tokens", "100"]
    refused(capsys, lambda: import_main([*base, "--out", str(tmp_path)]), "--out", "is a folder")
    refused(capsys, lambda: import_main([*base, "--out", str(world / "a-file" / "x.npz")]),
            "--out", "is a file, not a folder")
    refused(capsys, lambda: import_main(["--src", str(src), "--generations", "0,2,0", "--out",
                                         str(tmp_path / "x.npz")]), "--generations 0,2,0", "0 given more than once")
    refused(capsys, lambda: import_main([*base, "--out", str(tmp_path / "x.txt")]), "--out", "ending in .npz")
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.txt").exists()


@pytest.fixture
def locked(tmp_path, monkeypatch):
    """A folder in which nothing can be created (a read-only or special file system; made so by failing the
    creation, since tests may run as root)."""
    import tempfile
    folder = tmp_path / "locked"
    folder.mkdir()
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(13, "Permission denied")
        return real_mkdtemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    return folder


def test_an_out_nothing_can_be_created_in_is_one_line_for_every_command(world, tmp_path, capsys, locked):
    """An --out whose nearest existing folder takes no new entry (a read-only or special file system; here the
    creation is made to fail, since tests may run as root) is refused before anything runs, not an OSError
    traceback when the first result is written: the sweep, validate, the engine commands, import_gpt_oss."""
    from experiments.sweep import main as sweep
    from experiments.validate import main as validate
    from traces import import_gpt_oss
    from traces.io import output_problem
    out = locked / "results"
    assert output_problem(out) == f"nothing can be created in {locked} (Permission denied); give a folder you can write to"
    assert output_problem(tmp_path / "fine" / "deeper") is None and not (tmp_path / "fine").exists()
    for run in (lambda: sweep(["policy=lru", "cache_slots=4", "--no-plots", "--out", str(out)]),
                lambda: validate(["--out", str(out)])):
        assert run() == 2
        assert capsys.readouterr().err == f"error: --out {out}: {output_problem(out)}\n"
    refused(capsys, lambda: import_gpt_oss.main(["--sample-tokens", "100", "--out", str(out / "x.npz")]),
            f"--out {out / 'x.npz'}", "nothing can be created in")
    from experiments import record
    refused(capsys, lambda: record.main(["--model", str(world / "ckpt"), "--out", str(out), "--corpus",
                                         str(world / "corpus"), *CPU]), f"--out {out}", "nothing can be created in")
    assert list(locked.iterdir()) == []


def test_train_gate_refuses_a_depth_the_model_has_no_layers_for(world, tmp_path, capsys):
    from experiments import train_gate
    out = tmp_path / "gate"
    refused(capsys, lambda: train_gate.main(["--trace", str(world / "recorded.npz"), "--model", str(world / "ckpt"),
                                             "--out", str(out), "--device", "cpu", "--depth", "3"]),
            "--depth 3", "has 2 layers", "use --depth 1..1")
    assert not out.exists()


@pytest.mark.parametrize("extra, trace, words", [
    (("--lr", "nan"), "recorded.npz", ["--lr", "must be positive"]),
    (("--lr", "-1"), "recorded.npz", ["--lr", "must be positive"]),
    (("--batch-size", "0"), "recorded.npz", ["--batch-size", "must be at least 1"]),     # trained nothing, exit 0
    (("--batch-size", "-4"), "recorded.npz", ["--batch-size", "must be at least 1"]),
    (("--dtype", "int8"), "recorded.npz", ["--dtype", "invalid choice: 'int8'"]),
    ((), "bare.npz", ["--trace", "hidden_states: none recorded"]),
    ((), "truncated.npz", ["--trace", "truncated or corrupt"]),
    ((), "nope.npz", ["--trace"]),
])
def test_train_gate_refuses_bad_arguments_in_one_line_as_make_tracks(world, tmp_path, capsys, extra, trace, words):
    """Each was a traceback (ValueError from the optimiser, a negative tensor dimension, TraceError, ...) or, for
    --batch-size 0, a gate that learned nothing reported as trained."""
    from experiments import train_gate
    out = tmp_path / "gate"
    refused(capsys, lambda: train_gate.main(["--trace", str(world / trace), "--model", str(world / "ckpt"),
                                             "--out", str(out), "--device", "cpu", "--depth", "1", *extra]), *words)
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--minutes", "nan"), ("--minutes", "inf"), ("--max-epochs", "nan")])
def test_train_lm_refuses_a_nan_budget_before_preparing_data(world, tmp_path, capsys, flag, value):
    """--minutes nan failed with a traceback after the data's preparation; --max-epochs nan passed unnoticed."""
    from experiments import train_lm
    refused(capsys, lambda: train_lm.main(["--out", str(tmp_path / "m"), "--device", "cpu", "--corpus",
                                           str(world / "corpus"), flag, value]), flag)


def test_train_lm_ends_on_sigterm_in_one_line_leaving_nothing_behind(world, tmp_path):
    """SIGTERM (timeout, a scheduler) killed it without a word and left its partial folder beside --out."""
    import os
    import signal
    import subprocess
    import sys
    import time
    corpus = tmp_path.parent / f"{tmp_path.name}-corpus"      # held-out splits long enough to train on
    corpus.mkdir()
    for files in DOMAIN_FILES.values():
        for name in files:
            (corpus / name).write_text("".join(f"the quick brown fox {i} jumps over the lazy dog {i % 7}.\n"
                                              for i in range(4000)))
    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train_lm", "--out", str(out), "--size", "tiny",
                             "--device", "cpu", "--corpus", str(corpus), "--max-steps", "100000"],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line, deadline = "", time.monotonic() + 120
    while not line.startswith("step") and time.monotonic() < deadline:      # training steps are under way
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: nothing was written;") and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []          # neither --out nor its partial folder


@pytest.mark.parametrize("where", ["a-file/sub", "locked"])
def test_train_lm_refuses_an_out_it_cannot_write(world, capsys, locked, where):
    from experiments import train_lm
    out = (world / where) if where.startswith("a-file") else locked / "model"
    refused(capsys, lambda: train_lm.main(["--out", str(out), "--device", "cpu", "--corpus", str(world / "corpus")]),
            f"--out {out}")


# -- --policy-param: the engine commands that take --policies -------------------------------------------------
POLICY_PARAM_CASES = {
    "malformed": (["oraclecross_tokens=false"], ["--policy-param", "expected NAME.KEY=VALUE", "oracle.cross_tokens=false"]),
    "no value": (["oracle.cross_tokens"], ["--policy-param", "expected NAME.KEY=VALUE"]),
    "a list": (["oracle.cross_tokens=true,false"], ["--policy-param", "one value per parameter", "experiments.sweep"]),
    "not asked": (["belady.cross_tokens=false"], ["--policy-param belady.cross_tokens=false", "belady is not among",
                                                  "lru, oracle", "add it to --policies"]),
    "undeclared": (["oracle.cross_token=false"], ["--policy-param oracle.cross_token=false",
                                                  "policy OraclePrefetch has no parameter 'cross_token' (it declares: "
                                                  "cross_tokens); fix the name"]),
    "wrong type": (["oracle.cross_tokens=maybe"], ["--policy-param for oracle policy.cross_tokens=maybe: "
                                                   "policy oracle: cross_tokens='maybe' must be true or false",
                                                   "oracle_prefetch.py:"]),
    "twice": (["oracle.cross_tokens=false", "oracle.cross_tokens=true"], ["oracle.cross_tokens is given twice"]),
}


def _policy_param_command(command: str, world, tmp_path):
    """``command``'s argv (but --policy-param) running lru,oracle on the world's checkpoint or tiny trace, and its main."""
    import importlib
    tiny = str(Path(__file__).parent / "data" / "tiny-moe-trace.npz")
    out = ["--out", str(tmp_path / "out")]
    if command == "measure_policies":        # a recording: prompts, tokens and hidden states at every step
        from traces import load_trace
        base = load_trace(world / "recorded.npz")
        extra = {"prompts": [[1, 2, 3]], "new_tokens": 3, "reference_tokens": [[4, 5, 6]]}
        save_trace(dataclasses.replace(base, meta=dataclasses.replace(base.meta, extra=extra)), tmp_path / "rec.npz")
    argv = {"replay": ["replay", "--trace", tiny, "--slots", "2", *CPU],
            "live": ["live", "--model", str(world / "ckpt"), "--corpus", str(world / "corpus"), "--slots", "2", *CPU],
            "measure_policies": ["--model", str(world / "ckpt"), "--corpus", str(world / "corpus"), "--trace",
                                 str(tmp_path / "rec.npz"), "--train-trace", str(tmp_path / "rec.npz"), "--slots", "2",
                                 *CPU],
            "noise": ["--trace", tiny, "--slots", "2", "--device", "cpu"]}[command]
    module = "engine_bench" if command in ("replay", "live") else command
    return importlib.import_module(f"experiments.{module}").main, [*argv, *out, "--policies", "lru,oracle"]


@pytest.mark.parametrize("case", sorted(POLICY_PARAM_CASES))
@pytest.mark.parametrize("command", ["replay", "live", "measure_policies", "noise"])
def test_a_bad_policy_param_is_one_line_before_anything_runs(world, tmp_path, capsys, command, case):
    """--policy-param NAME.KEY=VALUE: malformed, a list, a policy the command does not run, a parameter the policy
    does not declare (``check_params``' words, as the sweep and validate say it), a value the policy refuses (built
    once, as the sweep builds it: the policy's own words, file and line), or given twice; exit code 2, nothing
    written."""
    main, argv = _policy_param_command(command, world, tmp_path)
    given, words = POLICY_PARAM_CASES[case]
    refused(capsys, lambda: main([*argv, *(a for text in given for a in ("--policy-param", text))]), *words)
    assert not (tmp_path / "out").exists()


def test_a_policy_param_naming_a_predictor_the_engine_lacks_is_refused(world, tmp_path, capsys):
    main, argv = _policy_param_command("live", world, tmp_path)
    refused(capsys, lambda: main([*argv, "--policies", "lru,lookahead", "--policy-param", "lookahead.predictor=nope"]),
            "--policy-param for lookahead policy.predictor=nope", "the engine's live predictors are pregate, quasi, "
            "lookahead")


# -- --name, sequence lengths, --timed-policy, results in the way, a replay --shape of another top-k ------------
@pytest.mark.parametrize("name", ["runs/moe-lm", "../up", "..", "", "a\\b"])
def test_a_name_that_is_a_path_is_refused(world, tmp_path, capsys, name):
    """--name becomes file names (OUT/<name>-trace.npz): a path in it wrote elsewhere or failed after the decode."""
    from experiments import record
    out = tmp_path / "out"
    refused(capsys, lambda: record.main(["--model", str(world / "ckpt"), "--out", str(out), "--corpus",
                                         str(world / "corpus"), "--name", name, *CPU]),
            "--name", "give a plain name")
    assert not out.exists()


def test_the_model_folder_dot_names_the_folder(world, tmp_path, monkeypatch):
    """`--model .` (no --name): the results are named after the folder, not '' (OUT/-trace.npz)."""
    import argparse
    from real.bench.args import check_model_args
    monkeypatch.chdir(world / "ckpt")
    args = argparse.Namespace(model=Path("."), name=None, device="cpu", dtype=None, out=tmp_path / "out")
    check_model_args(argparse.ArgumentParser(), args)
    assert args.name == "ckpt"


@pytest.mark.parametrize("command, extra, words", [
    ("record", ["--prompt-len", "200", "--new-tokens", "64"],
     ["--prompt-len 200 + --new-tokens 64 = 264 positions", "holds 256 positions", "max_position_embeddings 256",
      "lower them to 256 in all"]),
    ("references", ["--prompt-len", "250", "--new-tokens", "7"], ["--prompt-len 250 + --new-tokens 7 = 257"]),
    ("live", ["--prompt-len", "8", "--new-tokens", "8", "--score-len", "300"],
     ["--score-len 300", "holds 256 positions", "use --score-len 256 or less"]),
])
def test_a_decode_past_the_kv_cache_is_refused_before_the_model_loads(world, tmp_path, capsys, command, extra, words):
    """A prompt plus its new tokens (or a scored window) longer than the model's positions failed inside the
    decode, after the model was loaded and the references measured."""
    import importlib
    out = tmp_path / "out"
    module = importlib.import_module(f"experiments.{'engine_bench' if command == 'live' else command}")
    argv = [*(["live"] if command == "live" else []), "--model", str(world / "ckpt"), "--out", str(out), "--corpus",
            str(world / "corpus"), *(["--slots", "2", "--policies", "lru"] if command == "live" else []), *CPU, *extra]
    refused(capsys, lambda: module.main(argv), *words)
    assert not out.exists()


@pytest.mark.parametrize("command", ["live", "measure_policies"])
@pytest.mark.parametrize("timed, words", [("belady", ["--timed-policy belady", "not among the policies this command "
                                                       "runs (lru, oracle)", "add it to --policies"]),
                                           ("nope", ["--timed-policy nope", "unknown policy 'nope'"])])
def test_a_timed_policy_outside_the_run_is_refused(world, tmp_path, capsys, command, timed, words):
    """--timed-policy names the policy whose extra run records layer timings: one the command does not run was
    silently no timed run at all."""
    main, argv = _policy_param_command(command, world, tmp_path)
    refused(capsys, lambda: main([*argv, "--timed-policy", timed]), *words)
    assert not (tmp_path / "out").exists()


def test_the_default_timed_policy_among_none_of_the_policies_is_no_timed_run(world, tmp_path):
    """--timed-policy left at its default (lru) with --policies without lru: accepted, as before (no timed run)."""
    import argparse
    from experiments.config import policy_label
    from real.bench.args import check_policy_params
    args = argparse.Namespace(policy_param=[], timed_policy="lru")
    check_policy_params(argparse.ArgumentParser(), args, ("belady", "oracle"), policy_label, SHAPE, 2, 1)
    args.timed_policy = "oracle"
    check_policy_params(argparse.ArgumentParser(), args, ("belady", "oracle"), policy_label, SHAPE, 2, 1)


TINY = str(Path(__file__).parent / "data" / "tiny-moe-trace.npz")


@pytest.mark.parametrize("where", ["engine.csv", "correctness.csv", "resolved_config-engine_bench-replay.yaml",
                                   "errors"])
def test_engine_bench_refuses_results_it_could_not_write(tmp_path, capsys, where):
    """A folder where engine.csv (or another result file) goes, or a file where OUT/errors goes: found before
    measuring, not by the first write after the runs."""
    from experiments.engine_bench import main as bench
    out = tmp_path / "out"
    out.mkdir()
    if where == "errors":
        (out / "errors").write_text("not a folder")
        words = [f"{out / 'errors'} is a file where the command keeps a folder", "move it away"]
    else:
        (out / where).mkdir()
        words = [f"{out / where} is a folder where the command writes a file", "move it away"]
    refused(capsys, lambda: bench(["replay", "--trace", TINY, "--out", str(out), "--slots", "2", "--policies", "lru",
                                   *CPU]), f"--out {out}", *words)
    assert sorted(p.name for p in out.iterdir()) == [where]


def test_record_refuses_results_it_could_not_write(world, tmp_path, capsys):
    from experiments import record
    out = tmp_path / "out"
    (out / "correctness.csv").mkdir(parents=True)
    refused(capsys, lambda: record.main(["--model", str(world / "ckpt"), "--out", str(out), "--corpus",
                                         str(world / "corpus"), *CPU]), "correctness.csv is a folder")


@pytest.mark.parametrize("top_k", [1, 3])
def test_engine_bench_replay_refuses_a_shape_of_another_top_k(tmp_path, capsys, top_k):
    """--shape with the trace's layers and experts but another top-k: every run failed inside the model (a size
    mismatch or an index out of range), the command exited 0 beside NaN rows."""
    from experiments.engine_bench import main as bench
    shape = tmp_path / "shape.yaml"
    shape.write_text(f"name: tiny-k{top_k}\nnum_layers: 3\nnum_experts: 6\ntop_k: {top_k}\nhidden_size: 32\n"
                     "expert_intermediate_size: 64\nnum_attention_heads: 4\nnum_kv_heads: 2\nhead_dim: 8\n"
                     "vocab_size: 64\n")
    out = tmp_path / "out"
    refused(capsys, lambda: bench(["replay", "--trace", TINY, "--shape", str(shape), "--out", str(out), "--slots", "3",
                                   "--policies", "lru", *CPU]),
            "recorded for tiny-moe (3 layers, top-2 of 6 experts)", f"not tiny-k{top_k} (3 layers, top-{top_k} of 6",
            "drop --shape")
    assert not (out / "engine.csv").exists()


@pytest.mark.parametrize("command", ["record", "references", "live"])
@pytest.mark.parametrize("extra, corpus, words", [
    (["--prompts", "8"], "corpus", ["--prompts 8: the corpus has 7 domains", "use --prompts 7 or fewer"]),
    (["--prompts", "2"], "flat-corpus", ["--corpus", "flat-corpus", "arxiv text has an empty held-out split",
                                         "text on both sides of the split"]),
    # a prompt shorter than --prompt-len was decoded silently, the recorded settings saying the length asked
    (["--prompts", "2", "--prompt-len", "200"], "short-corpus", ["--prompt-len 200: the corpus's arxiv held-out text "
                                                                 "gives", "tokens", "or less"]),
])
def test_prompts_the_corpus_cannot_give_are_refused(world, tmp_path, capsys, command, extra, corpus, words):
    """More prompts than the corpus has domains gave fewer prompts silently; a domain with an empty held-out split
    gave an empty prompt, which failed in the decode (UnboundLocalError) after the model was loaded."""
    import importlib
    module = importlib.import_module(f"experiments.{'engine_bench' if command == 'live' else command}")
    out = tmp_path / "out"
    argv = [*(["live", "--slots", "2", "--policies", "lru"] if command == "live" else []), "--model",
            str(world / "ckpt"), "--out", str(out), "--corpus", str(world / corpus), "--prompt-len", "8",
            "--new-tokens", "4", *CPU, *extra]
    refused(capsys, lambda: module.main(argv), *words)
    assert not out.exists()


def test_train_prompts_past_the_domains_are_refused(world, tmp_path, capsys):
    from experiments import record
    refused(capsys, lambda: record.main(["--model", str(world / "ckpt"), "--out", str(tmp_path / "out"), "--corpus",
                                         str(world / "corpus"), "--prompts", "2", "--train-prompts", "9", *CPU]),
            "--train-prompts 9: the corpus has 7 domains", "use --train-prompts 7 or fewer")


@pytest.mark.parametrize("option", ["--max-tokens", "--warmup-tokens"])
def test_engine_bench_replay_refuses_more_tokens_than_the_trace_holds(tmp_path, capsys, option):
    """--max-tokens past what the trace holds after its training slice was cut silently to what it holds, and
    the row recorded the number asked for (README: replay times exactly N tokens)."""
    from experiments.engine_bench import main as bench
    from traces import load_trace
    trace = load_trace(TINY)
    _, rest = trace.split(0.25)
    out = tmp_path / "out"
    asked = ["--max-tokens", str(rest.num_tokens)] if option == "--warmup-tokens" else []
    refused(capsys, lambda: bench(["replay", "--trace", TINY, "--out", str(out), "--slots", "3", "--policies", "lru",
                                   *asked, option, str(rest.num_tokens + 1), *CPU]),
            f"holds {rest.num_tokens} tokens after its training slice", f"fewer than {option} {rest.num_tokens + 1}",
            f"at most {rest.num_tokens}")
    assert not (out / "engine.csv").exists()


@pytest.mark.parametrize("extra, words", [
    (["--gate-lr", "-0.001"], ["--gate-lr", "-0.001: must be positive"]),
    (["--gate-lr", "0"], ["--gate-lr", "0: must be positive"]),
    (["--accelerate-gpu-GiB", "-2"], ["--accelerate-gpu-GiB", "-2: must be at least 0"]),
])
def test_live_refuses_a_learning_rate_or_accelerate_budget_of_the_wrong_sign(world, tmp_path, capsys, extra, words):
    """A negative --gate-lr trained the gate uphill, a negative --accelerate-gpu-GiB reached accelerate; both are
    refused by argparse before anything loads."""
    from experiments import engine_bench
    out = tmp_path / "out"
    argv = ["live", "--model", str(world / "ckpt"), "--out", str(out), "--corpus", str(world / "corpus"),
            "--slots", "2", "--policies", "lru", *CPU, *extra]
    refused(capsys, lambda: engine_bench.main(argv), *words)
    assert not out.exists()
