"""Why does the lossy substitution not change tokens on CUDA? One variant per process (env read at import)."""
import os, sys, json
import torch, numpy as np
sys.path.insert(0, "tests")
from test_engine import SHAPE, PROMPTS, NEW_TOKENS, _Substitute
from policies.registry import resolve_policy
from offload.session import RunSettings
from real.engine import OffloadEngine
from real.shape_model import random_model

impl = sys.argv[1] if len(sys.argv) > 1 else "sdpa"
dtype = torch.bfloat16
def mk():
    return random_model(SHAPE, "cuda", dtype, seed=1, max_len=64, attention_impl=impl)
ref_m = mk(); ref_m.expert_blobs = ref_m.expert_blobs.to("cuda"); ref_m.capture_graphs()
ref = [ref_m.generate_greedy(p, NEW_TOKENS) for p in PROMPTS]
lossy = type("Substitute", (_Substitute, resolve_policy("lru")), {})
eng = OffloadEngine(mk(), SHAPE, lossy, RunSettings(cache_slots=SHAPE.num_experts))
log = []
orig_reweigh, orig_launch, orig_decide = eng.reweigh, eng._launch, eng.decide
def reweigh(layer, run, weights):
    w = orig_reweigh(layer, run, weights)
    g = eng.model._graphs
    if g is not None and len(log) < 6:
        torch.cuda.synchronize(); log.append(("readout_after_set_run", layer, run, w, g.readouts[layer][:4].tolist()))
    return w
def launch(slot, pos):
    if len(log) < 12: log.append(("launch", slot, pos))
    return orig_launch(slot, pos)
eng.reweigh, eng._launch = reweigh, launch
res = eng.generate(PROMPTS, NEW_TOKENS)
lossless = OffloadEngine(mk(), SHAPE, resolve_policy("lru"), RunSettings(cache_slots=SHAPE.num_experts)).generate(PROMPTS, NEW_TOKENS)
# how much the MoE half moves the residual (eager path)
m = random_model(SHAPE, "cuda", dtype, seed=1, max_len=64, attention_impl="eager"); m.expert_blobs = m.expert_blobs.to("cuda")
rec = []
m.generate_greedy(PROMPTS[0], 3, record=rec)
print(json.dumps(dict(impl=impl, env={k: v for k, v in os.environ.items() if k.startswith("MOE_LAB")},
    graphed=eng.model._graphs is not None, expert_graphs=eng.expert_graphs is not None,
    lossy_equals_ref=res.generated == ref, lossless_equals_ref=lossless.generated == ref,
    replaced=res.stats.replaced, lossy=res.generated, ref=ref, routing_first=res.routing.experts[0],
    log=[str(x) for x in log]), default=str))
print("record type", type(rec), len(rec), str(rec[0])[:600] if rec else None)
