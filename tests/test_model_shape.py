import math
from pathlib import Path

import pytest
import yaml

from traces.model_shape import PRECISION_BITS, ModelShape, available_shapes, load_shape


def test_available_shapes_lists_the_models():
    # four public models and the project's own trained one
    assert available_shapes() == ["gpt-oss-20b", "mixtral-8x7b", "moe-lm", "olmoe-1b-7b", "qwen3-30b-a3b"]


@pytest.mark.parametrize("name", ["gpt-oss-20b", "mixtral-8x7b", "olmoe-1b-7b", "qwen3-30b-a3b"])
def test_every_shape_round_trips_through_dict(name):
    shape = load_shape(name)
    assert shape.name == name
    assert ModelShape.from_dict(shape.to_dict()) == shape


def test_gpt_oss_sizes_match_the_public_config():
    s = load_shape("gpt-oss-20b")
    assert (s.num_layers, s.num_experts, s.top_k, s.hidden_size) == (24, 32, 4, 2880)
    assert s.expert_params == 3 * 2880 * 2880
    assert s.expert_bytes("bf16") == 3 * 2880 * 2880 * 2  # 49.8 MB
    assert s.expert_bytes("mxfp4") == 13_000_000  # the override, not params * 4.25 / 8
    assert s.kv_bytes_per_token() == 2 * 8 * 64 * 2
    assert s.attention_params == 2 * 2880 * 64 * 64 + 2 * 2880 * 8 * 64


def test_mixtral_expert_bytes_follow_bits_per_weight():
    s = load_shape("mixtral-8x7b")
    params = 3 * 4096 * 14336
    assert s.expert_bytes("fp8") == params
    assert s.expert_bytes("int4") == math.ceil(params * 4.25 / 8)
    assert s.expert_bytes("int2") == math.ceil(params * 2.25 / 8)
    assert s.kv_bytes_per_token(bytes_per_value=1) == 2 * 8 * 128


def test_unknown_precision_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        load_shape("olmoe-1b-7b").expert_bytes("fp4")
    message = str(e.value)
    assert "'fp4'" in message and "olmoe-1b-7b" in message
    assert all(f"'{p}'" in message for p in PRECISION_BITS)


def test_unknown_name_lists_available_shapes():
    with pytest.raises(ValueError, match="mixtral-8x7b"):
        load_shape("mixtral-9x9b")


def test_load_shape_from_path(tmp_path):
    d = load_shape("olmoe-1b-7b").to_dict() | {"name": "tiny", "num_layers": 2}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    assert load_shape(str(path)).num_layers == 2


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("num_layers", 0, ["num_layers", "positive integer"]),
        ("hidden_size", 2.5, ["hidden_size", "positive integer"]),
        ("top_k", 99, ["top_k", "num_experts"]),
        ("name", "", ["name"]),
    ],
)
def test_from_dict_names_source_field_and_fix(tmp_path, field, value, words):
    d = load_shape("mixtral-8x7b").to_dict() | {field: value}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ValueError) as e:
        load_shape(str(path))
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_from_dict_rejects_missing_unknown_and_bad_override():
    good = load_shape("gpt-oss-20b").to_dict()
    with pytest.raises(ValueError, match="missing.*vocab_size"):
        ModelShape.from_dict({k: v for k, v in good.items() if k != "vocab_size"}, source="s.yaml")
    with pytest.raises(ValueError, match="unknown field.*num_expert"):
        ModelShape.from_dict(good | {"num_expert": 3}, source="s.yaml")
    with pytest.raises(ValueError, match="expert_bytes.*fp4"):
        ModelShape.from_dict(good | {"expert_bytes": {"fp4": 10}}, source="s.yaml")


@pytest.mark.parametrize("text, words", [("num_layers: [3\n", "not valid YAML"),
                                         ("- 3\n", "must be a mapping of field: value")])
def test_a_malformed_shape_file_is_one_value_error_naming_it(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}: .*{words}"):
        load_shape(str(path))


def test_engine_bench_replay_refuses_a_malformed_shape_in_one_line(tmp_path, capsys):
    from experiments.engine_bench import main as bench
    path = tmp_path / "bad.yaml"
    path.write_text("num_layers: [3\n")
    with pytest.raises(SystemExit) as exit_:
        bench(["replay", "--trace", str(Path(__file__).parent / "data" / "tiny-moe-trace.npz"), "--shape", str(path), "--device", "cpu",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"error: {path}: not valid YAML" in err and "Traceback" not in err
