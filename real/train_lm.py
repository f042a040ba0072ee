"""Train the project's own small MoE language model, from a seed, in a fixed wall-time budget, and
save it as a native Hugging Face Mixtral checkpoint with its tokenizer, a training report and the
routing statistics of its held-out text.

    python -m experiments.train_lm --out runs/moe-lm [--corpus DIR] [--minutes 7] [--seed 0]
                                   [--size h100|tiny] [--device cuda|cpu] [--max-steps N] [--no-compile]

Why the ``h100`` shape (16 layers, 8 experts, top-2, hidden 1024, expert intermediate 4096): offloading
is only worth studying when copying an expert costs more than computing a layer. One expert is
3 x 1024 x 4096 bf16 parameters = 25.2 MB; over PCIe Gen5 at about 55 GB/s it copies in about 0.46 ms,
while one MoE layer at batch 1 (attention plus two experts, about 28 M multiply-adds read from HBM at
about 3 TB/s) computes in about 0.05-0.1 ms on an H100. A copy is therefore at least twice, and up to
nine times, a layer's compute, as for Mixtral-8x7B (one 336 MB expert: about 6 ms against about
0.3 ms), so caching and prefetch policies matter as they do for real offloaded models. Its
1.67 B parameters (0.45 B active per token) train on one H100 in the budget: fp32 master weights and
AdamW states (27 GB) plus bf16 working weights fit in 80 GB next to a 16 k-token batch.

Training: bf16 weights for every matmul (Hugging Face's grouped expert matmul is not autocast-aware,
so autocast over fp32 weights would leave the experts in fp32) with fp32 master weights in the
optimizer; AdamW, linear warmup then cosine decay to 10 % of the peak rate; 512-token windows drawn
at random from the concatenated train split of all domains. The number of steps is fixed once the
speed of the first steps is known (or by ``--max-steps``), so the schedule is a function of the step
alone and a run is reproduced by passing its reported ``steps`` as ``--max-steps`` (bit for bit on
CPU; on CUDA up to the nondeterminism of its kernels). On CUDA the training step runs under
``torch.compile`` (measured on an H100: 152 ms per 16 k-token step against 264 ms eager, for about a
minute of compilation); ``--no-compile`` turns it off, and a compile that fails falls back to eager.

The whole output folder is built beside ``--out`` and moved into place in one ``os.replace``
(``train_and_save``); the command line is ``experiments/train_lm.py``.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

from real.corpus import DOMAINS, EOS_TOKEN, encode_corpus, load_corpus, save_tokenizer, train_tokenizer
from traces.io import atomic_write
from traces.model_shape import ModelShape
from traces.stats import routing_stats


@dataclass(frozen=True)
class ModelSize:
    """A training recipe: the model's shape (``traces.ModelShape``, the one spelling of a shape) and
    how it is trained."""
    shape: ModelShape
    batch_windows: int                  # training windows per step
    eval_batch_windows: int
    warmup_steps: int
    log_every_steps: int
    eval_tokens_per_domain: int
    max_chars_per_domain: int | None    # None: the whole corpus


SIZES: dict[str, ModelSize] = {
    "h100": ModelSize(shape=ModelShape("moe-lm", num_layers=16, num_experts=8, top_k=2, hidden_size=1024,
                                       expert_intermediate_size=4096, num_attention_heads=16, num_kv_heads=4,
                                       head_dim=64, vocab_size=8192), batch_windows=32, eval_batch_windows=32, warmup_steps=50, log_every_steps=25,
                      eval_tokens_per_domain=65536, max_chars_per_domain=None),
    "tiny": ModelSize(shape=ModelShape("moe-lm-tiny", num_layers=2, num_experts=4, top_k=2, hidden_size=64,
                                       expert_intermediate_size=128, num_attention_heads=4, num_kv_heads=2,
                                       head_dim=16, vocab_size=512), batch_windows=4, eval_batch_windows=8, warmup_steps=10, log_every_steps=5,
                      eval_tokens_per_domain=4096, max_chars_per_domain=200_000),
}

SEQ_LEN = 512
MAX_POSITIONS = 2048
ROPE_THETA = 10000.0
ROUTER_AUX_LOSS_COEF = 0.01
PEAK_LR = 3e-4
FINAL_LR_FRACTION = 0.1
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
SPEED_PROBE_STEPS = (3, 10)         # steps timed to fix the step count (after warm-up of kernels)
SAVE_RESERVE_S = 5.0                # slack kept between the last step and the deadline


def mixtral_config(size: ModelSize, eos_id: int) -> MixtralConfig:
    shape = size.shape
    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}}
            if "rope_parameters" in inspect.signature(MixtralConfig.__init__).parameters
            else {"rope_theta": ROPE_THETA})
    return MixtralConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.expert_intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, max_position_embeddings=MAX_POSITIONS,
        num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k, router_aux_loss_coef=ROUTER_AUX_LOSS_COEF, output_router_logits=False,
        tie_word_embeddings=False, sliding_window=None, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=eos_id, attn_implementation="sdpa", **rope)


# ----------------------------------------------------------------------------------------------
# training

class MasterWeights:
    """fp32 master copies of the model's parameters: the optimizer steps them and the (bf16) model
    receives the rounded result. For an fp32 model the masters are the parameters themselves."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.separate = dtype != torch.float32
        if self.separate:
            self.masters = [p.detach().clone().float().requires_grad_(True) for p in self.params]
            model.to(dtype)
        else:
            self.masters = self.params

    def grads_to_masters(self) -> None:
        if self.separate:
            for p, m in zip(self.params, self.masters):
                m.grad = p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        if self.separate:
            for p, m in zip(self.params, self.masters):
                p.copy_(m)


def lr_at(step: int, total_steps: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return PEAK_LR * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return PEAK_LR * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(masters, device: torch.device) -> torch.optim.AdamW:
    decay = [m for m in masters if m.ndim >= 2]
    no_decay = [m for m in masters if m.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def train(model, train_tokens: np.ndarray, probe_windows: torch.Tensor, size: ModelSize, device: torch.device,
          dtype: torch.dtype, seed: int, deadline: float, max_steps: int | None, t0: float,
          compile_forward: bool = False, max_epochs: float | None = None) -> dict:
    """Train until ``max_steps``, or else the step count that the measured speed fits before
    ``deadline``, capped at ``max_epochs`` passes over the train tokens.
    ``probe_windows`` (held-out text) give the held-out loss at every tenth log line, to show overfitting."""
    forward = torch.compile(model) if compile_forward else model
    compiled = compile_forward
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(train_tokens.astype(np.int64))
    offsets = np.arange(SEQ_LEN)
    masters = MasterWeights(model, dtype)
    opt = make_optimizer(masters.masters, device)
    total_steps = max_steps
    log, window = [], []
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    tokens_per_step = size.batch_windows * SEQ_LEN
    step = 0
    stopped_by = "steps"
    probe_t = {}
    model.train()
    t_train = time.perf_counter()
    while total_steps is None or step < total_steps:
        if time.perf_counter() >= deadline:
            stopped_by = "time"
            break
        lr = lr_at(step, total_steps or 10 ** 9, size.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(tokens) - SEQ_LEN, size=size.batch_windows)
        batch = tokens[torch.from_numpy(starts[:, None] + offsets)].to(device, non_blocking=True)
        try:
            out = _loss(forward, batch, device)
        except Exception as exc:                      # torch.compile could not handle this model here
            if not (compiled and step == 0):
                raise
            print(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); training eagerly", flush=True)
            forward, compiled = model, False
            opt.zero_grad(set_to_none=True)
            out = _loss(forward, batch, device)
        out.loss.backward()
        masters.grads_to_masters()
        torch.nn.utils.clip_grad_norm_(masters.masters, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        masters.masters_to_model()
        aux = out.aux_loss.detach().float()
        loss_sum += out.loss.detach().float() - ROUTER_AUX_LOSS_COEF * aux
        aux_sum += aux
        window.append(step)
        step += 1

        if total_steps is None and step in SPEED_PROBE_STEPS:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            probe_t[step] = time.perf_counter()
            if step == SPEED_PROBE_STEPS[1]:
                step_s = (probe_t[step] - probe_t[SPEED_PROBE_STEPS[0]]) / (SPEED_PROBE_STEPS[1] - SPEED_PROBE_STEPS[0])
                total_steps = max(step, step + int((deadline - SAVE_RESERVE_S - probe_t[step]) / step_s))
                if max_epochs is not None:
                    total_steps = max(step, min(total_steps, int(max_epochs * len(tokens) / tokens_per_step)))
                print(f"speed probe: {step_s * 1e3:.1f} ms/step -> {total_steps} steps in the budget", flush=True)
        if step == 1 or step % size.log_every_steps == 0 or step == total_steps:
            lm = loss_sum.item() / len(window)
            elapsed = time.perf_counter() - t_train
            log.append({"step": step, "loss": round(lm, 5), "aux_loss": round(aux_sum.item() / len(window), 5),
                        "lr": lr, "elapsed_s": round(time.perf_counter() - t0, 2)})
            held = ""
            if step % (10 * size.log_every_steps) == 0 or step == total_steps:
                log[-1]["held_out_loss"] = round(_held_out_loss(model, probe_windows, device), 5)
                held = f"  held-out {log[-1]['held_out_loss']:.4f}"
            print(f"step {step:6d}  loss {lm:.4f}  aux {log[-1]['aux_loss']:.4f}{held}  lr {lr:.2e}  "
                  f"tok/s {step * tokens_per_step / elapsed:,.0f}  elapsed {log[-1]['elapsed_s']:.0f}s", flush=True)
            loss_sum.zero_()
            aux_sum.zero_()
            window = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t_train
    tail = [x["loss"] for x in log[-3:]]
    return {"steps": step, "planned_steps": total_steps, "stopped_by": stopped_by, "compiled": compiled,
            "tokens_seen": step * tokens_per_step, "train_s": round(train_s, 2),
            "tokens_per_s": round(step * tokens_per_step / max(train_s, 1e-9), 1),
            "final_train_loss": float(np.mean(tail)) if tail else None, "loss_log": log}


def _loss(forward, batch: torch.Tensor, device: torch.device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return forward(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)


@torch.no_grad()
def _held_out_loss(model, windows: torch.Tensor, device: torch.device) -> float:
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(input_ids=windows.to(device), labels=windows.to(device), use_cache=False).loss.item()
    model.train()
    return loss


@torch.no_grad()
def evaluate(model, held_out: dict[str, np.ndarray], size: ModelSize, device: torch.device) -> tuple[dict, dict]:
    """Held-out perplexity per domain (up to ``eval_tokens_per_domain`` tokens in whole 512-token
    windows, each window a fresh context) and the routing statistics of those same tokens."""
    model.eval()
    ppl, experts, domain_of, starts = {}, [], [], []
    n_tokens = 0
    for domain in DOMAINS:
        toks = held_out[domain][:size.eval_tokens_per_domain]
        n_windows = len(toks) // SEQ_LEN
        if n_windows == 0:
            raise ValueError(f"held-out split of {domain} has {len(toks)} tokens, fewer than one {SEQ_LEN}-token window")
        windows = torch.from_numpy(toks[:n_windows * SEQ_LEN].astype(np.int64).reshape(n_windows, SEQ_LEN))
        nll, count = 0.0, 0
        for i in range(0, n_windows, size.eval_batch_windows):
            batch = windows[i:i + size.eval_batch_windows].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(input_ids=batch, output_router_logits=True, use_cache=False)
            logits = out.logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum").item()
            count += batch[:, 1:].numel()
            top = torch.stack([r.float().topk(size.shape.top_k, dim=-1).indices for r in out.router_logits], dim=1)
            experts.append(top.to(torch.uint8).cpu().numpy())                # [B*S, L, K]
            starts.extend(n_tokens + SEQ_LEN * j for j in range(batch.shape[0]))
            n_tokens += batch.numel()
        domain_of.extend([domain] * (n_windows * SEQ_LEN))
        ppl[domain] = {"tokens": count, "perplexity": round(math.exp(nll / count), 4)}
    stats = routing_stats(np.concatenate(experts), size.shape.num_experts, np.asarray(domain_of), np.asarray(starts))
    return ppl, stats


# ----------------------------------------------------------------------------------------------
# one run, saved

@dataclass(frozen=True)
class TrainSettings:
    """One training run. ``size``: a key of ``SIZES``; ``device``: "cuda" or "cpu"; ``minutes``: the
    wall-time budget from the start to the last training step (evaluation and saving follow);
    ``max_steps``: train exactly this many steps (None: as many as the measured speed fits in the
    budget, capped at ``max_epochs`` passes over the train tokens, None: no cap); ``compile``:
    ``torch.compile`` the training step; ``experts_implementation``: a transformers experts kernel
    name, None for the library's default."""
    corpus: Path
    size: str = "h100"
    device: str = "cuda"
    minutes: float = 7.0
    seed: int = 0
    max_steps: int | None = None
    max_epochs: float | None = 6.0
    compile: bool = True
    experts_implementation: str | None = None


# What ``train_and_save`` writes (save_pretrained's weights and generation config, the tokenizer, the reports): a
# folder holding these and train_report.json is an earlier output, which a new run may replace whole.
OUTPUT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "routing_stats.json",
                          "train_report.json"})


def replace_problem(path: Path) -> str | None:
    """Why ``train_and_save`` may not replace ``path`` (a folder it would delete files of that it did not write),
    or None: ``path`` is absent, an empty folder or an earlier output (train_report.json and nothing but the
    files this command writes). The message (``--out PATH`` goes before it) names the entries and the fix."""
    if not path.exists():
        return None
    if not path.is_dir():
        return "is a file, not a folder: choose another --out"
    entries = sorted(e.name for e in path.iterdir())
    if not entries:
        return None
    if "train_report.json" not in entries:
        return (f"holds {_listed(entries)} and is not an earlier output of this command (no train_report.json); "
                f"the output replaces the folder whole: choose another --out, or remove them")
    foreign = [e for e in entries if e not in OUTPUT_FILES or not (path / e).is_file()]
    if foreign:
        return (f"is an earlier output of this command but also holds {_listed(foreign)}, which it did not write "
                f"and replacing the folder would delete: choose another --out, or move them out")
    return None


def _listed(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


def _publish(tmp_dir: Path, out: Path) -> None:
    """Move the finished folder into place; an earlier output is swapped out first, then removed. The
    files in it are each written atomically already; this makes the folder appear as a whole. A folder
    that became foreign while the model trained (a file put in it) is left as it is, and so is the model."""
    if (problem := replace_problem(out)) is not None:
        raise SystemExit(f"error: --out {out} {problem}; the trained model is kept in {tmp_dir}")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp_dir, out)
    if old is not None:
        shutil.rmtree(old)


def train_and_save(settings: TrainSettings, out: Path, command: list[str]) -> dict:
    """Train a model of ``settings.size`` from ``settings.seed`` and save it to ``out`` (built beside it,
    moved into place whole; an earlier output there is replaced): a Hugging Face Mixtral checkpoint,
    its tokenizer, ``train_report.json`` (``command`` is recorded in it) and ``routing_stats.json``.
    Returns the report. Raises ValueError when a corpus domain's held-out split is shorter than one
    window; nothing is left at ``out`` on an error."""
    t0 = time.perf_counter()
    deadline = t0 + settings.minutes * 60
    size = SIZES[settings.size]
    device = torch.device(settings.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(settings.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")

    corpus = load_corpus(settings.corpus, size.max_chars_per_domain)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    try:
        report = _train_and_save(settings, command, corpus, size, device, dtype, t0, deadline, tmp_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _publish(tmp_dir, out)
    print(f"-> {out}", flush=True)
    return report


def _train_and_save(settings: TrainSettings, command: list[str], corpus, size: ModelSize, device: torch.device,
                    dtype: torch.dtype, t0: float, deadline: float, tmp_dir: Path) -> dict:
    tokenizer = train_tokenizer((t for d in DOMAINS for t in corpus[d].train), size.shape.vocab_size)
    save_tokenizer(tokenizer, tmp_dir, MAX_POSITIONS)
    train_ids = encode_corpus(tokenizer, {d: corpus[d].train for d in DOMAINS})
    held_ids = encode_corpus(tokenizer, {d: corpus[d].held_out for d in DOMAINS})
    train_tokens = np.concatenate([train_ids[d] for d in DOMAINS])
    t_data = time.perf_counter() - t0
    print(f"data: {len(train_tokens):,} train tokens, "
          f"{sum(len(v) for v in held_ids.values()):,} held-out tokens, "
          f"vocab {tokenizer.get_vocab_size()}, {t_data:.1f}s", flush=True)

    config = mixtral_config(size, tokenizer.token_to_id(EOS_TOKEN))
    with torch.device(device):
        model = MixtralForCausalLM(config)
    if settings.experts_implementation:
        model.set_experts_implementation(settings.experts_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - expert_params + expert_params * size.shape.top_k // size.shape.num_experts
    impl = {"attention": model.config._attn_implementation,
            "experts": getattr(model.config, "_experts_implementation", "eager")}
    print(f"model: {n_params / 1e6:.1f} M parameters ({active / 1e6:.1f} M active per token), "
          f"{impl}, weights {dtype}, compile {settings.compile}", flush=True)
    probe = torch.from_numpy(np.stack([held_ids[d][:SEQ_LEN].astype(np.int64) for d in DOMAINS]))
    result = train(model, train_tokens, probe, size, device, dtype, settings.seed, deadline, settings.max_steps,
                   t0, settings.compile, settings.max_epochs or None)
    ppl, stats = evaluate(model, held_ids, size, device)
    stats["source"] = {"model": "moe-offload-lab small Mixtral", "text": "held-out corpus splits",
                       "window_tokens": SEQ_LEN, "requests_are": "512-token windows"}

    model.config.output_router_logits = False
    save_kwargs = ({"safe_serialization": True}
                   if "safe_serialization" in inspect.signature(model.save_pretrained).parameters else {})
    model.save_pretrained(tmp_dir, **save_kwargs)
    cfg_path = tmp_dir / "config.json"
    saved_cfg = json.loads(cfg_path.read_text())
    saved_cfg.setdefault("rope_theta", ROPE_THETA)      # readers that predate rope_parameters
    _write_json(cfg_path, saved_cfg)
    # safetensors writes the weights 0600; they should read like the other outputs (the umask's mode)
    for weights in tmp_dir.glob("*.safetensors"):
        os.chmod(weights, cfg_path.stat().st_mode & 0o777)

    wall_s = time.perf_counter() - t0
    report = {
        "command": command,
        "seed": settings.seed, "size": settings.size, "model_shape": asdict(size.shape),
        "recipe": {k: v for k, v in asdict(size).items() if k != "shape"}, "seq_len": SEQ_LEN,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "weights_dtype": str(dtype).removeprefix("torch."), "master_weights": "float32",
        "implementations": impl,
        "optimizer": {"name": "AdamW", "peak_lr": PEAK_LR, "final_lr_fraction": FINAL_LR_FRACTION,
                      "warmup_steps": size.warmup_steps, "betas": [0.9, 0.95], "weight_decay": WEIGHT_DECAY,
                      "grad_clip": GRAD_CLIP, "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF},
        "parameters": n_params, "active_parameters_per_token": active,
        "train_tokens_available": int(len(train_tokens)),
        "held_out_tokens": {d: int(len(held_ids[d])) for d in DOMAINS},
        "budget_minutes": settings.minutes, "max_epochs": settings.max_epochs, "data_prep_s": round(t_data, 2),
        **result,
        "epochs": round(result["tokens_seen"] / len(train_tokens), 3),
        "held_out_perplexity": ppl,
        "routing_summary": stats["summary"],
        "wall_s": round(wall_s, 2),
        "corpus": str(settings.corpus),
    }
    _write_json(tmp_dir / "routing_stats.json", stats)
    _write_json(tmp_dir / "train_report.json", report)
    print(f"done in {wall_s:.0f}s: {result['steps']} steps, {result['tokens_seen']:,} tokens, "
          f"final train loss {result['final_train_loss']:.4f}; held-out perplexity "
          + ", ".join(f"{d} {v['perplexity']:.1f}" for d, v in ppl.items())
          + f"; reuse layer0 {stats['summary']['reuse_by_layer'][0]:.3f} mean {stats['summary']['reuse_mean']:.3f}"
          + f" (random {stats['random_reuse']:.3f})", flush=True)
    return report
