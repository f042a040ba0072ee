"""``real.model.MoEModel`` against Hugging Face's own forward and generate, one tiny random model per
family, and ``real.checkpoint``'s layouts and errors. CPU, float32 and bfloat16."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from real.checkpoint import CheckpointError, MoEConfig, load_checkpoint, save_checkpoint  # noqa: E402
from real.model import MoEModel, context_buckets, unpack_expert  # noqa: E402
from real.pinned import is_page_locked  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.1, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
FAMILIES = {
    # family: (config class, model class, config fields). Each covers a different quirk: Mixtral's
    # float32 routing weights and sliding window; Qwen2-MoE's shared expert, qkv bias and top-4 without
    # renormalisation; Qwen3-MoE's per-head q/k norm with renormalisation and an explicit head_dim;
    # OLMoE's full-width q/k norm, clip_qkv and tied embeddings.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=7)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       num_experts=8, num_experts_per_tok=4, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                       norm_topk_prob=True, head_dim=24)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, clip_qkv=2.0,
                   tie_word_embeddings=True)),
}
SEQ = [5, 17, 99, 3, 64, 64, 120, 7, 0, 42, 88, 1]


def _hf_model(family: str, seed: int = 0):
    config_cls, model_cls, fields = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **fields))
    return _eager(model.eval())


def _eager(model):
    # The reference is transformers' plain per-expert loop and eager attention.
    model.set_attn_implementation("eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    """(family, HF model in float32, its save_pretrained folder)."""
    family = request.param
    model = _hf_model(family)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path, safe_serialization=True)
    return family, model, path


def _ours(path, dtype=torch.float32, device="cpu", **kw) -> MoEModel:
    cfg, tensors = load_checkpoint(path, dtype=dtype)
    return MoEModel(cfg, tensors, device=device, dtype=dtype, **kw)


def _step_logits(model: MoEModel, ids) -> torch.Tensor:
    model.reset()
    return torch.cat([model.decode_step(t, pos) for pos, t in enumerate(ids)]).float()


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


@torch.no_grad()
def test_logits_match_hf_float32(saved):
    family, hf, path = saved
    ref = hf(torch.tensor([SEQ]), use_cache=False).logits[0]
    ours = _step_logits(_ours(path), SEQ)
    assert _rel_err(ours, ref) < 1e-4, family


@torch.no_grad()
def test_greedy_matches_hf_generate(saved):
    family, hf, path = saved
    prompt = SEQ[:5]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert _ours(path).generate_greedy(prompt, 10) == ref, family


@torch.no_grad()
@pytest.mark.parametrize("attention_impl", ["sdpa", "eager"])
def test_logits_match_hf_bfloat16(saved, attention_impl):
    """In bfloat16 every rounding step matters: with transformers' eager attention arithmetic the
    logits are bit for bit those of transformers' eager modules (which also checks the routing-weight
    dtypes and the expert summation order); the fused SDPA kernel rounds differently."""
    family, _, path = saved
    hf = _eager(getattr(transformers, FAMILIES[family][1]).from_pretrained(path, dtype=torch.bfloat16).eval())
    ref = hf(torch.tensor([SEQ]), use_cache=False).logits[0]
    model = _ours(path, torch.bfloat16, attention_impl=attention_impl)
    assert model.expert_blobs.dtype == torch.bfloat16
    ours = _step_logits(model, SEQ)
    if attention_impl == "eager":
        assert torch.equal(ours, ref.float()), (family, _rel_err(ours, ref))
    assert _rel_err(ours, ref) < 2e-2, family


@torch.no_grad()
def test_split_api_and_record_equal_decode_step(saved):
    """The engine's path (route, expert per blob, combine) and a custom blob_of give decode_step's logits;
    the record holds each layer's routing and hidden state."""
    family, _, path = saved
    model = _ours(path)
    c = model.config
    model.reset()
    record = []
    want = model.decode_step(SEQ[0], 0, record=record)
    assert len(record) == c.num_layers
    model.reset()
    h = model.embed(SEQ[0])
    for layer in range(c.num_layers):
        h = model.attention(layer, h, 0)
        x, ids, w = model.route(layer, h)
        assert ids.shape == (1, c.top_k) and w.shape == (1, c.top_k)
        assert w.dtype == (torch.float32 if family == "mixtral" else model.dtype)
        rec = record[layer]
        assert torch.equal(rec.expert_ids, ids.reshape(-1)) and torch.equal(rec.hidden, x.reshape(-1))
        assert torch.equal(rec.probs.topk(c.top_k).indices, ids.reshape(-1))
        experts = ids.reshape(-1).tolist()
        outputs = {e: model.expert(x, model.expert_blobs[layer, e].clone()) for e in experts}
        h = model.combine(layer, h, x, experts, w, outputs)
    assert torch.equal(model.final(h), want)
    model.reset()
    copies = []
    via_blob_of = model.decode_step(SEQ[0], 0, blob_of=lambda l, e: copies.append((l, e)) or
                                    model.expert_blobs[l, e].clone())
    assert torch.equal(via_blob_of, want) and len(copies) == c.num_layers * c.top_k


def test_blob_layout_and_experts_device(saved):
    family, hf, path = saved
    cfg, tensors = load_checkpoint(path, dtype=torch.float32)
    model = MoEModel(cfg, tensors, experts_device="cpu", dtype=torch.float32)
    I, H = cfg.expert_intermediate_size, cfg.hidden_size
    assert model.expert_blobs.shape == (cfg.num_layers, cfg.num_experts, 3 * I * H)
    gate, up, down = unpack_expert(model.expert_blobs[1, 2], I, H)
    assert gate.data_ptr() == model.expert_blobs[1, 2].data_ptr()           # views, not copies
    ref = hf.model.layers[1].mlp.experts
    assert torch.equal(torch.cat([gate, up]), ref.gate_up_proj[2]) and torch.equal(down, ref.down_proj[2])
    shape = cfg.to_model_shape(family)
    assert (shape.num_layers, shape.num_experts, shape.top_k, shape.expert_intermediate_size) == (
        cfg.num_layers, cfg.num_experts, cfg.top_k, I)
    assert shape.expert_params * 4 == model.expert_blobs[0, 0].numel() * model.expert_blobs.element_size()


@torch.no_grad()
def test_fused_and_classic_layouts_load_identically(saved, tmp_path):
    """transformers 5.x's in-memory (fused) names, a sharded index, and save_checkpoint's classic
    per-expert layout all load to the same tensors."""
    family, hf, path = saved
    config = json.loads((path / "config.json").read_text())
    _, want = load_checkpoint(path, dtype=torch.float32)

    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if not (config.get("tie_word_embeddings") and k == "lm_head.weight")}
    assert any("experts.gate_up_proj" in k for k in state)
    names = sorted(state)
    half = len(names) // 2
    for shard, part in (("a.safetensors", names[:half]), ("b.safetensors", names[half:])):
        save_file({k: state[k] for k in part}, str(fused / shard))
    weight_map = {k: "a.safetensors" if i < half else "b.safetensors" for i, k in enumerate(names)}
    (fused / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(path / "config.json", fused / "config.json")

    classic = tmp_path / "classic"
    save_checkpoint(config, state, classic)
    on_disk = load_file(str(classic / "model.safetensors"))
    expert_name = ("model.layers.0.block_sparse_moe.experts.3.w1.weight" if family == "mixtral"
                   else "model.layers.0.mlp.experts.3.gate_proj.weight")
    assert expert_name in on_disk and not any("gate_up_proj" in k for k in on_disk)
    resaved = tmp_path / "resaved"
    save_checkpoint(config, want, resaved)           # internal names are accepted too

    for other in (fused, classic, resaved):
        cfg, got = load_checkpoint(other, dtype=torch.float32)
        assert cfg == MoEConfig.from_hf(config) and got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), other.name


@torch.no_grad()
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_hf(saved):
    """On the GPU: float32 logits and greedy tokens as transformers' (CPU), bfloat16 logits near
    transformers' on the GPU, and experts kept in pinned host memory served by the default blob_of."""
    family, hf, path = saved
    ref = hf(torch.tensor([SEQ]), use_cache=False).logits[0]
    cfg, tensors = load_checkpoint(path, dtype=torch.float32)
    model = MoEModel(cfg, tensors, device="cuda", dtype=torch.float32)
    assert _rel_err(_step_logits(model, SEQ).cpu(), ref) < 1e-4, family
    pinned = MoEModel(cfg, tensors, device="cuda", dtype=torch.float32, experts_device="cpu")
    assert is_page_locked(pinned.expert_blobs)
    assert pinned.generate_greedy(SEQ[:5], 10) == model.generate_greedy(SEQ[:5], 10)
    hf_gpu = _eager(getattr(transformers, FAMILIES[family][1]).from_pretrained(path, dtype=torch.bfloat16)
                    .to("cuda").eval())
    ref = hf_gpu(torch.tensor([SEQ], device="cuda"), use_cache=False).logits[0]
    for impl in ("sdpa", "eager"):
        ours = _step_logits(_ours(path, torch.bfloat16, device="cuda", attention_impl=impl), SEQ)
        assert _rel_err(ours, ref) < 2e-2, (family, impl)


# -- errors -----------------------------------------------------------------------------------------
def _copy(path, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path)


def test_pickle_checkpoint_refused(saved, tmp_path):
    dst = _copy(saved[2], tmp_path)
    (dst / "model.safetensors").unlink()
    (dst / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickle.*safe_serialization=True"):
        load_checkpoint(dst)


def test_missing_and_misshapen_tensors(saved, tmp_path):
    _, _, path = saved
    dst = _copy(path, tmp_path)
    tensors = load_file(str(dst / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*{name}.*missing"):
        load_checkpoint(dst)
    expert = next(n for n in ("model.layers.1.block_sparse_moe.experts.0.w2.weight",
                              "model.layers.1.mlp.experts.0.down_proj.weight",
                              "model.layers.1.mlp.experts.down_proj")      # the fused layout's name
                  if n in tensors)
    tensors[expert] = tensors[expert][..., :-1].contiguous()
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{expert}.*has shape"):
        load_checkpoint(dst)


def test_missing_shard(saved, tmp_path):
    dst = _copy(saved[2], tmp_path)
    names = list(load_file(str(dst / "model.safetensors")))
    (dst / "model.safetensors").unlink()
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*missing"):
        load_checkpoint(dst)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama"}, r"'llama' is not supported.*mixtral, qwen2_moe, qwen3_moe, olmoe"),
    ({"mlp_only_layers": [0]}, r"layers \[0\] are dense"),
    ({"decoder_sparse_step": 2}, r"layers \[0\] are dense"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type 'yarn'"),
    ({"num_hidden_layers": None}, "num_hidden_layers: missing"),
])
def test_config_errors(change, match, tmp_path):
    config = dict(transformers.Qwen2MoeConfig(**COMMON, **FAMILIES["qwen2_moe"][2]).to_dict(), **change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path)


def test_context_buckets():
    assert context_buckets(2048, "sdpa") == (64, 128, 256, 512, 1024, 2048)
    assert context_buckets(100, "sdpa") == (64, 100)
    assert context_buckets(64, "sdpa") == (64,) and context_buckets(16, "sdpa") == (16,)
    assert context_buckets(2048, "masked_window") == (2048,)


@torch.no_grad()
def test_bucketed_attention_is_the_exact_attention(saved):
    """What the graphs run (the position and mask on the device, every bucket long enough for the
    context) gives the exact-context attention's output and cache writes, sliding window included
    (Mixtral's window is 7), at bucket edges and the cache's last position."""
    family, _, path = saved
    model = _ours(path)
    assert model.context_buckets == (64, 128, 256)
    torch.manual_seed(0)
    model.kv_cache.normal_()
    h = torch.randn(1, model.config.hidden_size)
    for pos in (0, 5, 63, 64, 200, model.max_len - 1):
        model.set_position(pos)
        longer = [b for b in model.context_buckets if b > pos]
        assert model.context_buckets[model._bucket] == longer[0]
        before = model.kv_cache.clone()
        want = model.attention(1, h, pos)
        written = model.kv_cache.clone()
        for length in longer:
            model.kv_cache.copy_(before)
            got = model.attention_at(1, h, length)
            assert torch.equal(model.kv_cache, written), (family, pos, length)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{family} {pos} {length}")


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_from_the_float32_readout_is_transformers_rule(saved, dtype):
    """The combine the graphs run (ids and weights read from the float32 readout, the order a device
    argsort) gives, bit for bit, transformers' rule written out by hand: each output times its weight
    rounded once, summed one at a time in ascending expert id, then the shared expert, then the
    residual. Qwen2-MoE's top-4 and shared expert make the order matter."""
    family, _, path = saved
    model = _ours(path, dtype)
    K, H = model.config.top_k, model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    h, x = (torch.randn((1, H), generator=g).to(dtype) for _ in range(2))
    outputs = torch.randn((K, 1, H), generator=g).to(dtype)
    ids = torch.randperm(model.config.num_experts, generator=g)[:K].tolist()
    weights = model.weights_for(torch.softmax(torch.randn((1, model.config.num_experts), generator=g), -1),
                                torch.tensor([ids])).reshape(-1)
    terms = [(outputs[i] * weights[i]).to(dtype) for i in range(K)]
    order = sorted(range(K), key=ids.__getitem__)
    acc = terms[order[0]]
    for i in order[1:]:
        acc = acc + terms[i]
    shared = model.shared_expert(0, x)
    want = h + (acc if shared is None else acc + shared)
    readout = torch.tensor(ids + weights.float().tolist())
    got = model.moe_sum(0, h, x, readout[:K], readout[K:], outputs)
    assert torch.equal(got, want), family
    assert torch.equal(model.combine(0, h, x, ids, weights, {e: outputs[i] for i, e in enumerate(ids)}), want)


@torch.no_grad()
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_the_eager_path(saved):
    """The front graphs (the previous combine, attention + router per context bucket: position and mask on
    the device; the decode crosses the 64-position bucket), the back graph and the experts as ExpertGraphs
    give the eager path's logits to float32 rounding and its greedy tokens; so does the masked-window
    baseline."""
    family, _, path = saved
    cfg, tensors = load_checkpoint(path, dtype=torch.float32)
    eager = MoEModel(cfg, tensors, device="cuda", dtype=torch.float32, max_len=128)
    graphed = MoEModel(cfg, tensors, device="cuda", dtype=torch.float32, max_len=128)
    window = MoEModel(cfg, tensors, device="cuda", dtype=torch.float32, max_len=128, attention_impl="masked_window")
    assert graphed.capture_graphs() and graphed.graphed and not eager.graphed and window.capture_graphs()
    assert graphed.resident_expert_graphs is not None     # the experts run as graphs too
    assert _rel_err(_step_logits(graphed, SEQ), _step_logits(eager, SEQ)) < 1e-5, family
    assert _rel_err(_step_logits(window, SEQ), _step_logits(eager, SEQ)) < 1e-5, family
    tokens = eager.generate_greedy(SEQ[:5], 80)
    assert graphed.generate_greedy(SEQ[:5], 80) == tokens and window.generate_greedy(SEQ[:5], 80) == tokens, family


def test_quiet_gc_freezes_what_exists_and_gives_it_back():
    import gc
    from real.model import quiet_gc        # where callers import it from; it lives in real.resident
    before = gc.get_freeze_count()
    keep = [[i] for i in range(1000)]
    with quiet_gc():
        assert gc.get_freeze_count() >= before + len(keep)
        assert gc.isenabled()
    assert gc.get_freeze_count() == before
    with pytest.raises(RuntimeError), quiet_gc():
        raise RuntimeError("the decode loop failed")
    assert gc.get_freeze_count() == before
