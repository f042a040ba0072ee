"""measure_policies refuses a --depth a gate cannot reach on the model (the default 3 on a 2-layer model) with a
fix that can be followed: the depths the model allows, as make_tracks and train_gate say; before anything loads."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from experiments import measure_policies
from real.checkpoint import save_checkpoint
from real.corpus import DOMAIN_FILES, save_tokenizer, train_tokenizer
from real.shape_model import shape_config
from conftest import mixtral_config
from traces import ModelShape, save_trace, synthetic_trace

SHAPE = ModelShape("tiny-depth", num_layers=2, num_experts=4, top_k=2, hidden_size=16, expert_intermediate_size=16,
                   num_attention_heads=2, num_kv_heads=1, head_dim=8, vocab_size=300)
HF_CONFIG = mixtral_config(SHAPE, max_position_embeddings=256)


@pytest.fixture
def two_layers(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=g) * 0.3 for n, s in shape_config(SHAPE, 64).expected_shapes().items()}
    save_checkpoint(HF_CONFIG, tensors, tmp_path / "ckpt")
    save_tokenizer(train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300),
                   tmp_path / "ckpt", 64)
    (tmp_path / "corpus").mkdir()
    for files in DOMAIN_FILES.values():
        for name in files:
            (tmp_path / "corpus" / name).write_text("".join(f"the quick brown fox {i} jumps over the lazy dog.\n"
                                                            for i in range(400)))
    base = synthetic_trace(num_tokens=12, num_layers=2, num_experts=4, top_k=2, num_requests=2, seed=1)
    save_trace(dataclasses.replace(base, meta=dataclasses.replace(base.meta, model=SHAPE),
                                   hidden_states=np.zeros((12, 2, 16), np.float16), hidden_token_index=np.arange(12)),
               tmp_path / "recorded.npz")
    (tmp_path / "gate").mkdir()
    return tmp_path


def test_the_default_depth_on_a_two_layer_model_names_the_depths_it_allows(two_layers, capsys):
    w = two_layers
    with pytest.raises(SystemExit) as exit_:
        measure_policies.main(["--model", str(w / "ckpt"), "--out", str(w / "out"), "--trace", str(w / "recorded.npz"),
                               "--train-trace", str(w / "recorded.npz"), "--corpus", str(w / "corpus"),
                               "--gate", str(w / "gate"), "--policies", "lru", "--slots", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert "--depth 3" in line and "2 layers" in line and "use --depth 1..1" in line, line
    assert "retrain" not in line and not (w / "out").exists()
