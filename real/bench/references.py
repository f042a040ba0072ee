"""The references an offloaded run is read against: the model fully resident, every expert on the compute
device (the GPU, or the CPU a smoke run computes on: the upper bound, and the tokens every lossless policy
must reproduce), measured with the discipline of ``real.measurement`` (``measure_fully_resident``: the median
of interleaved repeats, as every engine figure; mode ``fully-resident``, which results written before it was
named so call ``fully-on-gpu``: ``real.bench.table.LEGACY_MODES``); our decoder's
logits against Hugging Face's forward; and Hugging Face accelerate's CPU offload (what a user without this
tool would run; one run: seconds per token)."""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from real.bench.engine_runs import figures, generated_of, measure_session, run_problems
from real.bench.table import FULLY_RESIDENT, NoiseFiles, engine_row, engine_table, measured_under, print_rows
from real.measurement import Config, Report, RunOutput
from real.model import MoEModel, quiet_gc


class ResidentRuns:
    """The run function (``real.measurement``) of the fully-resident reference: ``resident`` (every expert on
    its device, CUDA graphs captured on a GPU: the lean path the engine runs) greedily decodes ``prompts``
    (a warm-up pass: the first), each step timed as the engine times its steps, the figures from the
    generated steps. ``tokens``: the first measured run's; every measured run says whether its tokens equal
    them (``identical_tokens``)."""

    def __init__(self, resident: MoEModel, prompts: list[list[int]], new_tokens: int):
        self.resident, self.prompts, self.new_tokens = resident, prompts, new_tokens
        self.tokens: list[list[int]] | None = None

    def __call__(self, config: Config, warmup: bool) -> RunOutput:
        device = self.resident.device
        prompts = self.prompts[:1] if warmup else self.prompts
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with quiet_gc():                # as the engine decodes (its full collection stays outside the timing)
            timed_from = time.monotonic_ns()
            tokens, step_ms = self._decode(prompts)
        columns = {"gpu_mem_GB": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0}
        if not warmup:
            self.tokens = self.tokens or tokens
            columns["identical_tokens"] = tokens == self.tokens
        return RunOutput(generated_of(step_ms, prompts, self.new_tokens), columns, timed_from,
                         [i * self.new_tokens for i in range(len(prompts))])

    @torch.no_grad()
    def _decode(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[float]]:
        """The engine's greedy loop (``OffloadEngine.generate``) on the resident model: (new tokens per prompt,
        every step's wall time in ms, from its start to its next token on the host)."""
        model, step_ms, tokens = self.resident, [], []

        def step(token: int, pos: int) -> int:
            start = time.perf_counter_ns()
            nxt = int(model.decode_step(token, pos).argmax(-1).reshape(-1)[0])
            step_ms.append((time.perf_counter_ns() - start) / 1e6)
            return nxt

        for prompt in prompts:
            model.reset()
            for pos, token in enumerate(prompt):
                nxt = step(token, pos)
            out = []
            for i in range(self.new_tokens):
                out.append(nxt)
                nxt = step(nxt, len(prompt) + i)
            tokens.append(out)
        return tokens, step_ms


def fully_resident(resident: MoEModel, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], dict]:
    """One greedy decode of ``prompts`` by ``resident`` (``ResidentRuns``), for its tokens: (generated token ids
    per prompt, that one run's ``tokens_per_s``, ``tpot_ms_mean`` and ``gpu_mem_GB``). A published figure
    is ``measure_fully_resident``'s."""
    resident.capture_graphs()
    runs = ResidentRuns(resident, prompts, new_tokens)
    output = runs(Config({"mode": FULLY_RESIDENT}), False)
    tpot = sum(output.step_ms) / len(output.step_ms)
    return runs.tokens, {"tokens_per_s": 1e3 / tpot, "tpot_ms_mean": tpot, "gpu_mem_GB": output.columns["gpu_mem_GB"]}


def measure_fully_resident(resident: MoEModel, name: str, prompts: list[list[int]], new_tokens: int, out: Path,
                           repeats: int = 5, deadline_s: float | None = None, started: float | None = None,
                           settings: dict | None = None) -> tuple[list[list[int]] | None, Report, list[str]]:
    """The fully-resident reference's figure (every expert on ``resident``'s device): ``repeats`` runs of
    ``ResidentRuns`` (``measure_session``). Writes, after every run, its OUT/engine.csv row (mode
    ``fully-resident``: the median, spread, runs, outliers; the columns of ``settings``, the command's
    resolved config: ``real.bench.table.measured_under``) after the rows already there, and the session
    ``references-<name>`` of OUT's noise files. A row finished under the same settings and engine code is not
    measured again (``measure_session``'s resume): one untimed decode gives the tokens. Returns (the first
    measured run's tokens, None if every run failed or the deadline stopped the session before its first run,
    ``report.info["stopped"]`` saying so; the report; one line per failed run, or per run whose
    tokens differ from the first's)."""
    with measured_under(settings) if settings is not None else nullcontext():
        return _measure_fully_resident(resident, name, prompts, new_tokens, out, repeats, deadline_s, started,
                                       settings)


def _measure_fully_resident(resident: MoEModel, name: str, prompts: list[list[int]], new_tokens: int, out: Path,
                            repeats: int, deadline_s: float | None, started: float | None,
                            settings: dict | None) -> tuple[list[list[int]] | None, Report, list[str]]:
    resident.capture_graphs()
    config = Config({"mode": FULLY_RESIDENT, "policy": "none", "cache_slots": resident.config.num_experts})
    runs = ResidentRuns(resident, prompts, new_tokens)
    table = engine_table(out)
    files = NoiseFiles(out, f"references-{name}", settings or {})

    def rows(report: Report) -> list[dict]:
        found = figures(report)
        return [engine_row(name, FULLY_RESIDENT, "none", config.fields["cache_slots"], found[config.label])
                ] if config.label in found else []

    def progress(report: Report) -> None:
        files.write(report)
        table.replace(rows(report))

    report = measure_session(runs, [config], repeats, progress, deadline_s, started, errors_to=out)
    if not report.rows and "stopped" not in report.info:     # resumed (not stopped by the deadline): its row stays
        return fully_resident(resident, prompts, new_tokens)[0], report, []
    print_rows(rows(report), ["model", "mode", "tokens_per_s", "spread_pct", "runs", "outliers", "outlier_causes",
                              "gpu_mem_GB"])
    problems = run_problems(report) + [
        f"{config.label}: round {r['round']} generated other tokens than the first measured run (the decode is not "
        "deterministic)" for r in report.rows if not r["error"] and not r["identical_tokens"]]
    return runs.tokens, report, problems


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
