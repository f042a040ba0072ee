"""A saved lookahead gate's two files (``real.lookahead_gate.LookaheadGate.save``) read like every result file the
project writes: the umask's mode (safetensors' own writer left the weights 0600) and each file replaced whole by a
rename (gate.json was rewritten in place), so a reader never sees half of one."""
from __future__ import annotations

import json
import os

import torch

from real.lookahead_gate import CONFIG_NAME, WEIGHTS_NAME, LookaheadGate
from real.predictor_inputs import FrozenRouters
from real.shape_model import random_model
from traces import ModelShape

SHAPE = ModelShape("tiny-moe", num_layers=4, num_experts=4, top_k=2, hidden_size=16, expert_intermediate_size=24,
                   num_attention_heads=2, num_kv_heads=1, head_dim=8, vocab_size=32)


def test_a_saved_gate_has_the_umask_mode_and_is_replaced_atomically(tmp_path):
    model = random_model(SHAPE, "cpu", torch.float32, max_len=16)
    gate = LookaheadGate(FrozenRouters(model), depth=2, rank=4)
    folder = tmp_path / "gate"
    gate.save(folder, extra={"run": 1})
    umask = os.umask(0o022)
    os.umask(umask)
    files = [folder / WEIGHTS_NAME, folder / CONFIG_NAME]
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o666 & ~umask for f in files}
    earlier = [tmp_path / f"earlier-{f.name}" for f in files]
    for f, link in zip(files, earlier):
        os.link(f, link)            # the first save's files, as a reader that opened them holds them
    gate.save(folder, extra={"run": 2})
    assert json.loads(earlier[1].read_text())["extra"] == {"run": 1}        # replaced, not rewritten in place
    assert json.loads(files[1].read_text())["extra"] == {"run": 2}
    assert all(f.stat().st_ino != link.stat().st_ino for f, link in zip(files, earlier))
    assert not [p.name for p in folder.iterdir() if p.name not in (WEIGHTS_NAME, CONFIG_NAME)]    # no temp file
    loaded = LookaheadGate.load(folder, model)
    for name, p in gate.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p)
