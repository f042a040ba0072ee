"""The references an offloaded run is read against: the model fully on the GPU (the upper bound, and
the tokens every lossless policy must reproduce), our decoder's logits against Hugging Face's forward,
and Hugging Face accelerate's CPU offload (what a user without this tool would run)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from real.model import MoEModel, quiet_gc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fully_on_gpu(resident: MoEModel, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], dict]:
    """Greedy decode of ``prompts`` by ``resident`` (every expert on its device, CUDA graphs captured on
    a GPU: the lean path the engine runs). Returns (generated token ids per prompt, metrics:
    ``tokens_per_s``, ``tpot_ms_mean`` over the steps run, ``gpu_mem_GB`` peak, 0 on a CPU)."""
    device = resident.device
    cuda = device.type == "cuda"
    resident.capture_graphs()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with quiet_gc():                    # as the engine decodes (its full collection stays outside the timing)
        start = time.perf_counter()
        tokens = [resident.generate_greedy(p, new_tokens) for p in prompts]
        _sync(device)
        wall = time.perf_counter() - start
    ran = sum(len(p) + new_tokens for p in prompts) - len(prompts)   # no step after a request's last token
    return tokens, {"tokens_per_s": ran / wall, "tpot_ms_mean": 1e3 * wall / ran,
                    "gpu_mem_GB": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0}


def hf_parity(model_dir: Path, resident: MoEModel, prompt: list[int], generated: list[int]) -> dict:
    """Our resident model's logits at every position of ``prompt`` + ``generated`` (all but its last
    token) against Hugging Face's full-sequence forward in the same dtype: ``max_abs_diff``,
    ``max_abs_logit``, ``relative`` (their ratio) and ``argmax_agreement`` (fraction of positions)."""
    from transformers import AutoModelForCausalLM
    device = resident.device
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resident.dtype).to(device).eval()
    ids = prompt + generated[:-1]
    with torch.no_grad():
        ref = hf(torch.tensor([ids], device=device)).logits[0].float()
        resident.reset()
        ours = torch.cat([resident.decode_step(t, i) for i, t in enumerate(ids)]).float()
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    return {"positions": len(ids), "max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / scale,
            "argmax_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def accelerate_offload(model_dir: Path, prompt: list[int], new_tokens: int, gpu_GiB: float) -> dict:
    """accelerate's ``device_map="auto"`` with ``gpu_GiB`` of GPU memory and the rest on the CPU (CUDA
    only): greedy decode of ``prompt``, at most 16 new tokens (seconds per token: a few measure it).
    Returns ``tokens_per_s``, ``tpot_ms_mean`` and ``gpu_mem_GB`` peak."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="auto",
                                              max_memory={0: f"{gpu_GiB}GiB", "cpu": "100GiB"})
    torch.cuda.reset_peak_memory_stats()
    ids = torch.tensor([prompt], device="cuda")
    hf.generate(ids, max_new_tokens=2, do_sample=False)
    start = time.perf_counter()
    new_tokens = min(new_tokens, 16)
    hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    wall = time.perf_counter() - start
    return {"tokens_per_s": new_tokens / wall, "tpot_ms_mean": 1e3 * wall / new_tokens,
            "gpu_mem_GB": torch.cuda.max_memory_allocated() / 1e9}
