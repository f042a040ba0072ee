"""The corpus, tokenizer, routing statistics (traces.stats) and a tiny end-to-end training run of
experiments.train_lm over real.train_lm (CPU)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from real.corpus import DOMAINS, encode_corpus, load_corpus, split_bytes, drop_repeated_tail, train_tokenizer
from experiments.train_lm import main
from traces.stats import routing_stats

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPUS = DATA / "corpus"
GPT_OSS = DATA / "routing" / "gpt-oss-20b-dev.npz"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus folder {CORPUS} is absent")


# ---------------------------------------------------------------- corpus and tokenizer

def test_split_is_at_a_line_boundary_and_complete():
    data = b"".join(b"line %d\n" % i for i in range(100))
    train, held = split_bytes(data, 0.05)
    assert train + held == data
    assert train.endswith(b"\n") and held.startswith(b"line ")
    assert 0.04 * len(data) < len(held) < 0.07 * len(data)


def test_repeated_tail_is_dropped():
    body = b"".join(b"doc %d text\n" % i for i in range(50))
    assert drop_repeated_tail(body + body[:300]) == body
    assert drop_repeated_tail(body) == body


@needs_corpus
def test_splits_are_deterministic_and_disjoint():
    a, b = load_corpus(CORPUS), load_corpus(CORPUS)
    assert a == b and set(a) == set(DOMAINS)
    for domain, text in a.items():
        train = "\n".join(text.train)
        assert all(len(doc) > 10_000 for doc in text.held_out), domain
        held = [line for doc in text.held_out for line in doc.split("\n") if len(line) > 100]
        assert not any(line in train for line in held), f"{domain}: held-out line also in train"


@pytest.fixture(scope="module")
def small_corpus():
    if not CORPUS.is_dir():
        pytest.skip(f"corpus folder {CORPUS} is absent")
    corpus = load_corpus(CORPUS, max_chars_per_domain=60_000)
    tok = train_tokenizer((t for d in DOMAINS for t in corpus[d].train), vocab_size=512)
    return corpus, tok


def test_tokenizer_round_trips_every_domain(small_corpus):
    corpus, tok = small_corpus
    assert tok.get_vocab_size() == 512 and tok.token_to_id("<|endoftext|>") == 0
    for domain in DOMAINS:
        text = corpus[domain].held_out[0][:5000]
        assert tok.decode(tok.encode(text).ids) == text, domain


def test_encode_corpus_matches_whole_text_encoding(small_corpus):
    corpus, tok = small_corpus
    ids = encode_corpus(tok, {d: corpus[d].train for d in DOMAINS})
    for domain in DOMAINS:
        whole = np.concatenate([np.r_[np.asarray(tok.encode(t).ids), 0] for t in corpus[domain].train])
        assert ids[domain].dtype == np.uint16
        np.testing.assert_array_equal(ids[domain], whole)


# ---------------------------------------------------------------- routing statistics

def test_reuse_of_identical_tokens_is_one():
    ids = np.tile(np.array([[[1, 3], [0, 2]]]), (50, 1, 1))           # [T=50, L=2, K=2]
    stats = routing_stats(ids, num_experts=4)
    assert [layer["reuse"] for layer in stats["per_layer"]] == [1.0, 1.0]
    assert stats["per_layer"][0]["load_share"] == [0.0, 0.5, 0.0, 0.5]
    assert stats["per_layer"][0]["load_max_min_ratio"] is None and stats["per_layer"][0]["unused_experts"] == 2


def test_reuse_of_random_routing_is_k_over_e():
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(16, 4, replace=False) for _ in range(3)]) for _ in range(4000)])
    stats = routing_stats(ids, num_experts=16)
    assert stats["random_reuse"] == 0.25
    for layer in stats["per_layer"]:
        assert abs(layer["reuse"] - 0.25) < 0.02
        assert layer["load_entropy_normalized"] > 0.99


def test_request_boundaries_are_excluded():
    # two requests of 3 tokens; inside each the set is constant, across the boundary disjoint
    ids = np.array([[[0, 1]]] * 3 + [[[2, 3]]] * 3)
    assert routing_stats(ids, 4)["per_layer"][0]["reuse"] == pytest.approx(0.8)       # 4 of 5 pairs reuse
    stats = routing_stats(ids, 4, request_starts=np.array([0, 3, 6]))
    assert stats["per_layer"][0]["reuse"] == 1.0
    assert stats["requests"] == 2 and stats["consecutive_pairs"] == 4


def test_domain_specialisation():
    ids = np.array([[[0, 1]]] * 10 + [[[2, 3]]] * 10)
    domains = np.array(["a"] * 10 + ["b"] * 10)
    stats = routing_stats(ids, 4, domains=domains)
    assert stats["per_layer"][0]["domain_jsd_bits"] == pytest.approx(1.0)              # fully specialised
    assert stats["per_domain"]["a"]["max_lift_mean_over_layers"] == pytest.approx(2.0)
    same = routing_stats(np.array([[[0, 1]], [[2, 3]]] * 10), 4, domains=np.array(["a", "b"] * 10))
    assert same["per_layer"][0]["domain_jsd_bits"] == pytest.approx(1.0)
    mixed = routing_stats(np.array([[[0, 1]], [[2, 3]]] * 10), 4, domains=np.array(["a"] * 10 + ["b"] * 10))
    assert mixed["per_layer"][0]["domain_jsd_bits"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.skipif(not GPT_OSS.is_file(), reason=f"{GPT_OSS} is absent")
def test_gpt_oss_layer0_reuse_matches_the_data_readme():
    with np.load(GPT_OSS) as z:
        starts = z["gen_start"][:41]
        ids = z["experts"][:starts[-1]]
    stats = routing_stats(ids, num_experts=32, request_starts=starts)
    assert stats["random_reuse"] == 0.125
    assert 0.1 <= stats["per_layer"][0]["reuse"] <= 0.3
    assert all(0.25 <= layer["reuse"] <= 0.7 for layer in stats["per_layer"][1:])


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not CORPUS.is_dir():
        pytest.skip(f"corpus folder {CORPUS} is absent")
    out = tmp_path_factory.mktemp("train") / "tiny"
    report = main(["--size", "tiny", "--device", "cpu", "--minutes", "0.3", "--out", str(out), "--corpus", str(CORPUS)])
    return out, report


def test_tiny_run_trains_and_writes_a_mixtral_checkpoint(tiny_run):
    out, report = tiny_run
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "train_report.json", "routing_stats.json"]:
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".tiny.*")), "temporary folder left behind"
    losses = [x["loss"] for x in report["loss_log"]]
    assert report["steps"] >= 5 and losses[-1] < losses[0]
    assert json.loads((out / "train_report.json").read_text())["steps"] == report["steps"]
    assert set(report["held_out_perplexity"]) == set(DOMAINS)
    stats = json.loads((out / "routing_stats.json").read_text())
    assert stats["layers"] == 2 and stats["top_k"] == 2 and stats["num_experts"] == 4
    assert set(stats["per_domain"]) == set(DOMAINS)
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"


def test_checkpoint_loads_and_generates(tiny_run):
    from transformers import AutoTokenizer, MixtralForCausalLM
    out, _ = tiny_run
    model = MixtralForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_local_experts == 4 and tok.eos_token == "<|endoftext|>"
    ids = tok("The history of the", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == ids.shape[1] + 8 or gen[0, -1].item() == tok.eos_token_id
    assert isinstance(tok.decode(gen[0]), str)
    with torch.no_grad():
        out_logits = model(ids).logits
    assert torch.isfinite(out_logits).all()


def test_same_seed_gives_identical_losses(tiny_run, tmp_path):
    out, report = tiny_run
    args = ["--size", "tiny", "--device", "cpu", "--minutes", "1", "--max-steps", "5", "--corpus", str(CORPUS)]
    a = main(args + ["--out", str(tmp_path / "a")])
    assert a["loss_log"][0] == {**report["loss_log"][0], "elapsed_s": a["loss_log"][0]["elapsed_s"]}
    b = main(args + ["--out", str(tmp_path / "b")])
    assert [x["loss"] for x in a["loss_log"]] == [x["loss"] for x in b["loss_log"]]
    assert a["held_out_perplexity"] == b["held_out_perplexity"]
    # an earlier output of the command is replaced as a whole
    again = main(args + ["--out", str(tmp_path / "a"), "--max-steps", "1"])
    assert again["steps"] == 1 and json.loads((tmp_path / "a" / "train_report.json").read_text())["steps"] == 1


def test_weights_read_like_the_other_outputs(tiny_run):
    """safetensors writes model.safetensors 0600; every output has the mode of the files beside it."""
    out, _ = tiny_run
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["tokenizer.json"], modes


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("not ours")
    with pytest.raises(SystemExit):
        main(["--size", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "not ours"


def _earlier_output(folder: Path) -> None:
    from real.train_lm import OUTPUT_FILES
    folder.mkdir(parents=True)
    for name in OUTPUT_FILES:
        (folder / name).write_text("{}")


def _stand_in_corpus(root):
    """A folder holding every corpus file the command looks for (its arguments are checked before --out's
    contents; CI has no shared corpus)."""
    from real.corpus import DOMAIN_FILES
    root.mkdir()
    for files in DOMAIN_FILES.values():
        for name in files:
            (root / name).write_text("".join(f"the quick brown fox {i} jumps over the lazy dog.\n" for i in range(50)))
    return str(root)


def test_refuses_an_earlier_output_holding_a_file_it_did_not_write(tmp_path, capsys):
    """A user's file inside an earlier output would go with the folder: refused up front, the file named."""
    out = tmp_path / "my_traces"
    _earlier_output(out)
    (out / "important.npz").write_bytes(b"keep")
    (out / "notes").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["--size", "tiny", "--device", "cpu", "--out", str(out), "--corpus", _stand_in_corpus(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "important.npz, notes" in err and "choose another --out" in err, err
    assert (out / "important.npz").read_bytes() == b"keep" and (out / "train_report.json").is_file()


def test_refuses_a_checkpoint_it_did_not_write(tmp_path, capsys):
    """A downloaded checkpoint holds the same file names but no train_report.json: not ours to delete."""
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(SystemExit) as exit_:
        main(["--size", "tiny", "--device", "cpu", "--out", str(out), "--corpus", _stand_in_corpus(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "no train_report.json" in err and "config.json, model.safetensors" in err
    assert (out / "model.safetensors").read_bytes() == b"weights"


def test_a_file_put_in_the_folder_while_training_keeps_both(tmp_path):
    """The check runs again where the folder is replaced: a file that appeared meanwhile stays, and so does
    the trained model (its folder is named)."""
    from real.train_lm import _publish
    out, built = tmp_path / "lm", tmp_path / ".lm.partial-1"
    _earlier_output(out)
    _earlier_output(built)
    (out / "important.npz").write_bytes(b"keep")
    with pytest.raises(SystemExit, match="important.npz.*kept in .*partial-1"):
        _publish(built, out)
    assert (out / "important.npz").read_bytes() == b"keep" and (built / "train_report.json").is_file()
    (out / "important.npz").unlink()
    _publish(built, out)                      # an earlier output alone is replaced
    assert not built.exists() and (out / "train_report.json").is_file()
