"""``real.checkpoint.check_weight_headers``: the cheap check, before anything loads, that a checkpoint folder has
weights and that every weight file's header reads; the one the validation preflight runs on a live slice's model.
Its errors are the ones ``load_checkpoint`` gives for the same folder, word for word."""
from __future__ import annotations

import pytest
import torch

from conftest import mixtral_config
from real.checkpoint import CheckpointError, check_weight_headers, load_checkpoint, save_checkpoint
from real.shape_model import shape_config
from traces import ModelShape
from validation.preflight import slice_problems
from validation.scenario import Slice

SHAPE = ModelShape("tiny-moe", num_layers=2, num_experts=4, top_k=2, hidden_size=16, expert_intermediate_size=24,
                   num_attention_heads=2, num_kv_heads=1, head_dim=8, vocab_size=32)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny"
    tensors = {name: torch.randn(shape) * 0.02 for name, shape in shape_config(SHAPE, 64).expected_shapes().items()}
    save_checkpoint(mixtral_config(SHAPE), tensors, path)
    return path


def errors(path) -> tuple[str, str, list[str]]:
    """The message of check_weight_headers, of load_checkpoint, and the preflight's lines for a live slice."""
    with pytest.raises(CheckpointError) as headers:
        check_weight_headers(path)
    with pytest.raises(CheckpointError) as load:
        load_checkpoint(path, torch.float32)
    sl = Slice(name="s", mode="live", policies=("lru",), cache_slots=(2,), model=str(path))
    return str(headers.value), str(load.value), slice_problems(sl, "cpu", "scenario.yaml")


def test_a_whole_checkpoint_passes(checkpoint):
    assert check_weight_headers(checkpoint) is None
    sl = Slice(name="s", mode="live", policies=("lru",), cache_slots=(2,), model=str(checkpoint))
    assert slice_problems(sl, "cpu", "scenario.yaml") == []


def test_a_truncated_weight_file_is_the_error_load_checkpoint_gives(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    headers, load, preflight = errors(checkpoint)
    assert headers == load and headers.startswith(f"{weights}: not a readable safetensors file (")
    assert "truncated or damaged" in headers and headers.endswith("download this file again")
    assert preflight == [f"slice s of scenario.yaml: model: {' '.join(headers.split())} (or give the slice another "
                         f"'model')"]


def test_a_folder_without_weights_is_the_error_load_checkpoint_gives(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    headers, load, preflight = errors(checkpoint)
    assert headers == load == (f"{checkpoint}: neither model.safetensors nor model.safetensors.index.json found; "
                               f"save the model with save_pretrained(safe_serialization=True)")
    assert len(preflight) == 1 and headers in preflight[0]
