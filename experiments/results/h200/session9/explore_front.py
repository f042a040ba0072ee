"""Session 9, issue 13 (ran at b14493a; later renamed: MoEModel._output_route is now output_route): where the front graph's 46 us go, kernel by kernel, and candidate rewrites of
its pieces timed as CUDA graphs on the moe-lm shape (random weights). Exploration, not a benchmark of
record: prints tables; every candidate is checked against the current code's outputs."""
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from real.bench.kernel_timing import Clock, bench_shape, graphed
from real.layer_ops import fused_rms_norm, rope, weigh
from real.shape_model import random_model

T0 = time.time()
DEADLINE = float(os.environ.get("EXPLORE_S", "420"))
DRY = os.environ.get("EXPLORE_DRY") == "1"      # CPU dry run of the script itself (tiny shape, nothing compiled)
dev = torch.device("cpu" if DRY else "cuda")
clock = Clock(not DRY)
if DRY:
    from traces import ModelShape
    shape = ModelShape("tiny", 3, 6, 2, 32, 48, 4, 2, 8, 64)
    torch.compile = lambda fn, **kw: fn
else:
    shape = bench_shape("moe-lm", 16)
m = random_model(shape, dev, experts_device=dev, max_len=2048, compile_kernels=None if not DRY else False)
c = m.config
LAYER = 1 if DRY else 8
H, K, E = c.hidden_size, c.top_k, c.num_experts
heads, kvh, D = c.num_attention_heads, c.num_kv_heads, c.head_dim
Lw = m.layers[LAYER]
g = torch.Generator(device=dev).manual_seed(1)
h = torch.randn((1, H), device=dev, generator=g).to(torch.bfloat16)
attn_in = torch.randn((1, heads * D), device=dev, generator=g).to(torch.bfloat16)
print("buckets", m.context_buckets, flush=True)


def left():
    return DEADLINE - (time.time() - T0)


def timed(name, fn, n=200, reps=5):
    try:
        rep = graphed(fn, not DRY)
        us = [clock.us(rep, n) for _ in range(reps)]
        print(f"  {name:58s} {statistics.median(us):8.2f} us  (min {min(us):.2f} max {max(us):.2f})", flush=True)
        return statistics.median(us)
    except Exception as err:   # a candidate that fails to capture is reported, the rest still run
        print(f"  {name:58s} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
        traceback.print_exc(limit=3)
        return None


def kernels(name, fn, iters=20):
    if DRY:
        fn()
        return
    fn(); torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    acc = {}
    order = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if e.name not in acc:
            acc[e.name] = []
            order.append(e.name)
        acc[e.name].append(e.time_range.elapsed_us())
    total = 0.0
    print(f"-- kernels of {name} (per call, eager launch, device time)", flush=True)
    for n_ in order:
        v = acc[n_]
        per = sum(v) / iters
        total += per
        print(f"  {len(v) // iters:2d}x {per:7.2f} us  {n_[:110]}")
    print(f"  total {total:.2f} us over {sum(len(v) for v in acc.values()) / iters:.0f} kernels", flush=True)


# ---- 1. the current front, kernel by kernel -------------------------------------------------------
ids_f = torch.arange(K, dtype=torch.float32, device=dev)
w_f = torch.full((K,), 1.0 / K, device=dev)
x0 = m.route(LAYER, h)[0]
m.expert_out.copy_(torch.stack([m.expert(x0, m.expert_blobs[LAYER, e]) for e in range(K)]))
readout = torch.zeros(2 * K, dtype=torch.float32, device=dev)
x_out = torch.zeros_like(h)
for ctx in (16, 2048):
    m.set_position(ctx - 1)
    length = next(b for b in m.context_buckets if b >= ctx)

    def front(length=length):
        hh = m.moe_sum(LAYER - 1, h, x0, ids_f, w_f, m.expert_out)
        return m.front_at(LAYER, hh, length, x_out=x_out, readout=readout)
    kernels(f"front at context {ctx} (bucket {length})", front)
    timed(f"front graph, context {ctx}", front)
    timed(f"attention_at alone (incl o_proj), context {ctx}", lambda length=length: m.attention_at(LAYER, h, length))
    timed(f"_attention_bucket alone, context {ctx}", lambda length=length: m._attention_bucket(LAYER, h, length))
    timed(f"_output_route alone, context {ctx}", lambda: m._output_route(LAYER, h, attn_in, x_out, readout))
kernels("expert", lambda: m.expert(x0, m.expert_blobs[LAYER, 0], out=m.expert_out[0]))
timed("expert graph", lambda: m.expert(x0, m.expert_blobs[LAYER, 0], out=m.expert_out[0]))


# ---- 2. router candidates -----------------------------------------------------------------------
def route_mulsum(h, attn, o_proj, moe_norm_w, router_w, eps, top_k, x_out, readout, argmax_topk, o_mulsum):
    if o_mulsum:
        h = h + (attn.float() * o_proj.float()).sum(-1).to(h.dtype).view(1, -1)
    else:
        h = h + F.linear(attn, o_proj)
    x = fused_rms_norm(h, moe_norm_w, eps)
    logits = (x.float().unsqueeze(-2) * router_w.float().unsqueeze(0)).sum(-1)       # [1, E]
    probs = torch.softmax(logits, dim=-1)
    if argmax_topk:
        p = probs
        chosen, ids = [], []
        for _ in range(top_k):
            i = p.argmax(-1, keepdim=True)
            chosen.append(p.gather(-1, i))
            ids.append(i)
            p = p.scatter(-1, i, -1.0)
        chosen, ids = torch.cat(chosen, -1), torch.cat(ids, -1)
    else:
        chosen, ids = torch.topk(probs, top_k, dim=-1)
    weights = weigh(chosen, True, torch.float32)
    x_out.copy_(x)
    readout[:top_k].copy_(ids.reshape(-1))
    readout[top_k:2 * top_k].copy_(weights.reshape(-1))
    return h, x, ids, weights, probs


ref = m._output_route(LAYER, h, attn_in, x_out, readout)
ref_ids, ref_w = ref.ids.clone(), ref.weights.clone()
print("== router candidates (o_proj + residual + norm + router + softmax + top-k + readout)", flush=True)
timed("current (compiled attention_output_route)", lambda: m._output_route(LAYER, h, attn_in, x_out, readout))
for argmax_topk in (False, True):
    for o_mulsum in (False, True):
        if left() < 60:
            break
        fn = torch.compile(route_mulsum, dynamic=False)
        name = f"router mul-sum, topk={'argmax' if argmax_topk else 'torch'}, o_proj={'mul-sum' if o_mulsum else 'linear'}"
        try:
            out = fn(h, attn_in, Lw.o_proj, Lw.moe_norm, Lw.router, c.rms_norm_eps, K, x_out, readout, argmax_topk, o_mulsum)
            ok = torch.equal(out[2], ref_ids) and torch.allclose(out[3], ref_w, rtol=1e-2, atol=1e-3)
            print(f"  {name}: ids {out[2].tolist()} vs {ref_ids.tolist()}, same={ok}", flush=True)
        except Exception as err:
            print(f"  {name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        timed(name, lambda fn=fn, a=argmax_topk, o=o_mulsum: fn(h, attn_in, Lw.o_proj, Lw.moe_norm, Lw.router,
                                                                 c.rms_norm_eps, K, x_out, readout, a, o))
        kernels(name, lambda fn=fn, a=argmax_topk, o=o_mulsum: fn(h, attn_in, Lw.o_proj, Lw.moe_norm, Lw.router,
                                                                   c.rms_norm_eps, K, x_out, readout, a, o), iters=5)


# ---- 3. attention candidates ----------------------------------------------------------------------
print("== attention candidates (norm + qkv + rope + kv write + attention over the bucket)", flush=True)
from torch.nn.attention import SDPBackend, sdpa_kernel


def attention_fused(h, norm_w, qkv_w, rope_table, pos, cache, mask, eps, heads, kvh, D, scale, matmul):
    qkv = F.linear(fused_rms_norm(h, norm_w, eps), qkv_w)
    rows = qkv.view(heads + 2 * kvh, D)
    qk = rope(rows[:heads + kvh], rope_table.index_select(0, pos))
    kv = torch.stack((qk[heads:], rows[heads + kvh:]))
    cache.index_copy_(1, pos, kv.unsqueeze(1))
    keys, values = cache[0, :mask.shape[0]].transpose(0, 1), cache[1, :mask.shape[0]].transpose(0, 1)   # [KV, T, D]
    q = qk[:heads].view(kvh, heads // kvh, D)
    if matmul:
        s = torch.matmul(q.float(), keys.float().transpose(1, 2)) * scale + mask
        p = torch.softmax(s, -1)
        out = torch.matmul(p, values.float())
    else:
        s = (q.float().unsqueeze(2) * keys.float().unsqueeze(1)).sum(-1) * scale + mask       # [KV, G, T]
        p = torch.softmax(s, -1)
        out = (p.unsqueeze(-1) * values.float().unsqueeze(1)).sum(-2)                      # [KV, G, D]
    return out.to(h.dtype).reshape(1, -1)


for ctx in (16, 256, 2048):
    if left() < 40:
        print("  (deadline: attention candidates stopped)")
        break
    m.set_position(ctx - 1)
    length = next(b for b in m.context_buckets if b >= ctx)
    cur = m._attention_bucket(LAYER, h, length).clone()
    timed(f"ctx {ctx}: current _attention_bucket (default SDPA backend)", lambda: m._attention_bucket(LAYER, h, length))
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        def fn(be=be):
            with sdpa_kernel([be] if not DRY else [SDPBackend.MATH]):
                return m._attention_bucket(LAYER, h, length)
        timed(f"ctx {ctx}: SDPA forced {be.name}", fn)
    for matmul in (True, False):
        f = torch.compile(attention_fused, dynamic=False)
        args = (h, Lw.attn_norm, Lw.qkv, m._rope, m._pos, m.kv_cache[LAYER], m._mask[:length], c.rms_norm_eps,
                heads, kvh, D, m._scale, matmul)
        try:
            out = f(*args)
            err = (out.float() - cur.float()).abs().max().item()
            print(f"  ctx {ctx}: fused ({'matmul' if matmul else 'mul-sum'}) max |diff| vs current {err:.3g}", flush=True)
        except Exception as e:
            print(f"  ctx {ctx}: fused FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        timed(f"ctx {ctx}: one compiled function ({'matmul' if matmul else 'mul-sum'})", lambda f=f, args=args: f(*args))
        if ctx == 16:
            kernels(f"fused attention ({'matmul' if matmul else 'mul-sum'}) ctx 16", lambda f=f, args=args: f(*args), iters=5)

# ---- 4. expert candidates -------------------------------------------------------------------------
print("== expert candidates", flush=True)
I = c.expert_intermediate_size
blob = m.expert_blobs[LAYER, 0]
gu = blob[:2 * I * H].view(2 * I, H)
down = blob[2 * I * H:].view(H, I)
outbuf = m.expert_out[0]
ref_e = m.expert(x0, blob).clone()


def expert_mulsum_down(x, gu, down, out):
    a = F.linear(x, gu)
    gate, up = a.chunk(2, dim=-1)
    act = (F.silu(gate.float()) * up.float()).to(x.dtype)
    out.copy_((act.float() * down.float()).sum(-1).to(x.dtype).view(1, -1))
    return out


def expert_linear(x, gu, down, out):
    a = F.linear(x, gu)
    gate, up = a.chunk(2, dim=-1)
    out.copy_(F.linear(F.silu(gate) * up, down))
    return out


timed("gate_up GEMV alone (F.linear)", lambda: F.linear(x0, gu))
timed("down GEMV alone (F.linear)", lambda: F.linear(x0.repeat(1, 4)[:, :I], down))
for name, fn_ in (("expert, down as mul-sum (compiled)", expert_mulsum_down), ("expert, all compiled (linear)", expert_linear)):
    if left() < 30:
        break
    f = torch.compile(fn_, dynamic=False)
    try:
        o = f(x0, gu, down, outbuf).clone()
        print(f"  {name}: max |diff| {(o.float() - ref_e.float()).abs().max().item():.3g}", flush=True)
        timed(name, lambda f=f: f(x0, gu, down, outbuf))
        kernels(name, lambda f=f: f(x0, gu, down, outbuf), iters=5)
    except Exception as e:
        print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
if left() > 60:
    f = torch.compile(expert_linear, dynamic=False, mode="max-autotune-no-cudagraphs")
    try:
        f(x0, gu, down, outbuf)
        timed("expert, max-autotune", lambda: f(x0, gu, down, outbuf))
    except Exception as e:
        print(f"  max-autotune FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
print(f"done in {time.time() - T0:.0f} s", flush=True)
