"""Session 7 diagnostic: why does a hit layer right after a miss layer take longer on the host (calibration
pattern `alternate`, decide_us ~230 us against ~64 us in `hits`)? Times every host step of the layer turn,
for a random-weight moe-lm at max_len 64 (as the moe-lm-random slice, which showed no excess) and 1040 (as
the replay slices, which did)."""
import gc, json, sys, time
import numpy as np, torch
from offload.session import RunSettings
from policies.lru import LRU
from real.engine import OffloadEngine
from real.shape_model import random_model
from traces.model_shape import load_shape
from traces.synthetic import pattern_trace

dev = "cuda" if torch.cuda.is_available() else "cpu"
shape = load_shape(sys.argv[1] if len(sys.argv) > 1 else "moe-lm")
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 48
out = {}

def instrument(engine):
    ev = []
    pc = time.perf_counter_ns
    def wrap(obj, name, tag):
        f = getattr(obj, name)
        def w(*a, **k):
            t0 = pc()
            try:
                return f(*a, **k)
            finally:
                ev.append((tag, t0, pc()))
        setattr(obj, name, w)
    wrap(engine.model, "read_routing", "wait")
    wrap(engine.model, "front", "front")
    wrap(engine.model, "set_run", "set_run")
    wrap(engine, "_launch_resident", "launch_resident")
    wrap(engine, "chosen", "chosen")
    wrap(engine.ctrl, "begin_layer", "begin_layer")
    wrap(engine, "start_copies", "start_copies")
    wrap(engine, "launch_experts", "launch_experts")
    wrap(engine, "decide", "decide")
    wrap(engine.ctrl, "prefetch_layer", "prefetch_layer")
    wrap(engine.copies, "_issue", "issue")
    wrap(engine.copies, "_retire", "retire")
    wrap(engine.copies, "release_slots", "release_slots")
    return ev

def per_layer(ev):
    layers, cur = [], None
    for tag, t0, t1 in ev:
        if tag == "wait":
            cur = {"start": t0, "wait_end": t1, "issue": 0}
            layers.append(cur); cur["d"] = {}
        if cur is None:
            continue
        cur["d"][tag] = cur["d"].get(tag, 0) + (t1 - t0)
        if tag == "issue":
            cur["issue"] += 1
        cur["end"] = t1
    return layers

for max_len in [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "64,1040").split(",")]:
    model = random_model(shape, dev, torch.bfloat16 if dev == "cuda" else torch.float32, max_len=max_len)
    res = {}
    for pattern in ("hits", "alternate", "alternate"):
        trace = pattern_trace(shape, steps, pattern)
        settings = RunSettings(cache_slots=shape.top_k)
        OffloadEngine(model, shape, LRU, settings).replay(trace, max(steps // 4, 2))
        for variant in ("plain", "instrumented"):
            engine = OffloadEngine(model, shape, LRU, settings, record_host_stamps=True)
            ev = instrument(engine) if variant == "instrumented" else None
            r = engine.replay(trace)
            row = {"step_ms": float(np.median(r.routing.step_ms[1:])),
                   "decide_us": float(np.median(engine.decide_ns[len(engine.decide_ns) // steps:]) / 1e3) if engine.decide_ns else None,
                   "miss_issue_us": float(np.median(engine.miss_issue_ns[len(engine.miss_issue_ns) // steps:]) / 1e3) if engine.miss_issue_ns else None}
            if ev:
                L = per_layer(ev)[shape.num_layers:]          # first step left out
                prev_miss = [False] + [l["issue"] > 0 for l in L[:-1]]
                for kind in ("hit_after_hit", "hit_after_miss", "miss"):
                    sel = [l for l, pm in zip(L, prev_miss)
                           if (kind == "miss") == (l["issue"] > 0) and (kind != "miss" and (kind == "hit_after_miss") == pm or kind == "miss")]
                    if not sel:
                        continue
                    tags = sorted({t for l in sel for t in l["d"]})
                    row[kind] = {"n": len(sel), **{t: round(float(np.median([l["d"].get(t, 0) for l in sel])) / 1e3, 1) for t in tags},
                                 "after_wait_to_end": round(float(np.median([l["end"] - l["wait_end"] for l in sel])) / 1e3, 1)}
            res[f"{pattern}/{variant}/{len(res)}"] = row
            print(max_len, pattern, variant, json.dumps(row), flush=True)
            del engine
    out[max_len] = res
    del model; gc.collect(); torch.cuda.empty_cache() if dev == "cuda" else None
print(json.dumps(out))
