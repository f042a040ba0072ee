"""Figures from results tables (one row per configuration) and from simulated timelines, as PNG.

Drawn on ``matplotlib.figure.Figure`` with the Agg canvas, without pyplot: no backend to choose, no
global figure registry to close figures in, and pyplot's import is not paid by a sweep that plots.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from sim.simulator import Timeline

if TYPE_CHECKING:
    import pandas as pd

# Keys that, when they vary in a table besides policy and cache_slots, split a policy's line in two.
_SERIES_KEYS = ("cache_mode", "precision", "hardware", "pcie_GBps", "copy_latency_us", "copy_engines",
                "prefetch_depth", "train_fraction", "max_tokens", "prompt_tokens", "policy_params", "trace")


def _series(df: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame, dict]]:
    """(label, rows sorted by cache_slots, line style) per policy and per combination of the other varying
    keys. A lossy policy's label says so (it ran other experts than the routed ones: its hits are not
    comparable with a lossless policy's). Styles differ for every series: ten colours, then other markers
    and dashes."""
    varying = [k for k in _SERIES_KEYS if k in df.columns and df[k].astype(str).nunique() > 1]
    keys = ["policy", *varying]
    colours = matplotlib.colormaps["tab10"].colors
    for i, (values, group) in enumerate(df.groupby(keys, sort=False, dropna=False)):
        values = values if isinstance(values, tuple) else (values,)
        label = values[0] + "".join(f" {k}={v}" for k, v in zip(varying, values[1:]))
        if "replaced" in group.columns and group["replaced"].fillna(0).sum() > 0:
            label += " (lossy)"
        style = {"color": colours[i % 10], "marker": "osD^v"[i // 10 % 5], "linestyle": ("-", "--", ":")[i // 10 % 3]}
        yield label, group.sort_values("cache_slots"), style


def _slots_label(df: pd.DataFrame) -> str:
    """The x axis: in global mode the count is still per layer, but all layers share one pool."""
    modes = set(df["cache_mode"])
    if modes == {"per_layer"}:
        return "cache slots per layer"
    if modes == {"global"}:
        return "cache slots per layer, shared globally (one pool of slots × layers)"
    return "cache slots per layer (cache_mode=global: one pool of slots × layers, shared by all layers)"


def _title(df: pd.DataFrame, what: str) -> str:
    def one(col: str) -> str:
        vals = list(dict.fromkeys(df[col].astype(str))) if col in df.columns else []
        return ", ".join(vals)
    return f"{what}\n{one('model')} on {one('hardware')} ({one('precision')})"


def _figure(**kwargs) -> Figure:
    """A figure on the Agg canvas (what pyplot would have given it with the Agg backend)."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_tokens_vs_slots(df: pd.DataFrame, path: str | Path) -> None:
    fig = _figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    for label, rows, style in _series(df):
        ax.plot(rows["cache_slots"], rows["tokens_per_s"], label=label, **style)
    ax.set_xlabel(_slots_label(df))
    ax.set_ylabel("decode tokens/s (simulated)")
    ax.set_xticks(sorted(df["cache_slots"].unique()))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(_title(df, "Tokens/s against cache size"), fontsize=10)
    _save(fig, path)


def plot_hit_rate_vs_belady(df: pd.DataFrame, path: str | Path) -> None:
    """Left: hit rate per policy with Belady's MIN as a dashed reference. Right: hits as % of Belady's."""
    fig = _figure(figsize=(12, 4.8))
    left, right = fig.subplots(1, 2)
    for label, rows, style in _series(df):
        left.plot(rows["cache_slots"], rows["hit_rate"], label=label, **style)
        right.plot(rows["cache_slots"], 100 * rows["belady_hit_fraction"].astype(float), label=label, **style)
    bound = (df.assign(belady_rate=df["belady_hits"] / df["accesses"])
               .groupby("cache_slots")["belady_rate"].first())
    left.plot(bound.index, bound.values, "k--", linewidth=2, label="Belady MIN (optimal eviction)")
    right.axhline(100, color="k", linestyle="--", linewidth=2)
    slots = sorted(df["cache_slots"].unique())
    left.set_ylabel("hit rate")
    left.set_ylim(0, 1)
    right.set_ylabel("hits as % of Belady's MIN")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.set_xlabel(_slots_label(df))
        ax.set_xticks(slots)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")
    fig.suptitle(_title(df, "Hit rate against Belady's optimum"), fontsize=10)
    _save(fig, path)


_COMPUTE, _DEMAND, _PREFETCH = "#4c72b0", "#c44e52", "#55a868"


def busy_share(spans, limit_ns: float) -> float:
    """The share of [0, ``limit_ns``] that ``spans`` [(start_ns, end_ns), ...] cover, for spans that do not
    overlap each other (one stream's or one copy engine's work); 0 for an empty window."""
    if limit_ns <= 0:
        return 0.0
    return sum(max(0.0, min(e, limit_ns) - s) for s, e in spans if s < limit_ns) / limit_ns


def plot_timeline(timeline: Timeline, path: str | Path, max_ms: float | None = None,
                  config: str | None = None) -> None:
    """Lanes: the compute stream, then each copy engine, each labelled with the share of the shown time it
    is busy; demand and prefetch copies coloured apart, token ends as thin grey lines. Bars are drawn at
    their true widths (a 20 us expert beside 1 ms copies may be thinner than a pixel: the busy share says
    how much there is). ``config``: the configuration shown, for the title (e.g. the sweep's
    ``policy=lru cache_slots=4``)."""
    engines = sorted({c.engine for c in timeline.copies}) or [0]
    fig = _figure(figsize=(14, 1.2 + 0.7 * (1 + len(engines))))
    ax = fig.subplots()
    ms = 1e-6
    end_ms = max([timeline.token_end_ns[-1] * ms] if timeline.token_end_ns else [0.0])
    limit = min(max_ms, end_ms) if max_ms is not None else end_ms

    def bars(spans):
        return [(s * ms, (e - s) * ms) for s, e in spans if s * ms < limit]

    def busy(spans) -> str:
        return f"{100 * busy_share(spans, limit / ms):.0f} % busy" if limit > 0 else "idle"

    compute = [(e.start_ns, e.end_ns) for e in timeline.compute]
    lanes = [f"compute\n{busy(compute)}"] + [
        f"copy engine {e}\n{busy([(c.start_ns, c.end_ns) for c in timeline.copies if c.engine == e])}"
        for e in engines]
    height = 0.6
    ax.broken_barh(bars(compute), (0 - height / 2, height), facecolors=_COMPUTE, edgecolor="none")
    for lane, engine in enumerate(engines, start=1):
        copies = [c for c in timeline.copies if c.engine == engine]
        for demand, colour in ((True, _DEMAND), (False, _PREFETCH)):
            # Alternate shades so back-to-back copies read as separate bars.
            for parity, alpha in ((0, 1.0), (1, 0.6)):
                spans = ((c.start_ns, c.end_ns) for i, c in enumerate(copies)
                         if c.demand == demand and i % 2 == parity)
                ax.broken_barh(bars(spans), (lane - height / 2, height), facecolors=colour, alpha=alpha,
                               edgecolor="none")
    for end_ns in timeline.token_end_ns:
        if end_ns * ms <= limit:
            ax.axvline(end_ns * ms, color="grey", linewidth=0.5, alpha=0.6)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, limit if limit > 0 else 1)
    ax.set_xlabel("simulated time (ms); grey lines: token ends")
    ax.legend(handles=[Patch(color=_COMPUTE, label="expert compute"), Patch(color=_DEMAND, label="demand copy"),
                       Patch(color=_PREFETCH, label="prefetch copy")],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=8, frameon=False)
    shown = f" (first {limit:.3g} ms shown)" if limit < end_ms else ""
    which = f"{config}: " if config else ""
    ax.set_title(f"{which}timeline of the first {len(timeline.token_end_ns)} tokens{shown}", fontsize=10, loc="left")
    _save(fig, path)


def plot_validation(table: pd.DataFrame, path: str | Path) -> None:
    """The simulator's tokens/s against the engine's (``validation.report`` long table), log-log, one marker
    per shape and colour per policy family; the y = x line and the band of the engine's median noise floor
    around it; each point's horizontal bar spans its runs (min..max)."""
    t = table[table["metric"] == "tokens_per_s"]
    fig = _figure(figsize=(6.5, 6))
    ax = fig.subplots()
    markers = dict(zip(sorted(t["shape"].unique()), "osD^vP*X"))
    colours = {"on-demand": "tab:blue", "bound": "tab:green", "prefetching": "tab:orange", "lossy": "tab:red"}
    for (shape, fam), g in t.groupby(["shape", "family"]):
        ax.errorbar(g["measured"], g["predicted"],
                    xerr=[g["measured"] - g["measured_min"], g["measured_max"] - g["measured"]],
                    fmt=markers[shape], color=colours.get(fam, "k"), ms=5, lw=0.8, capsize=2,
                    label=f"{shape} · {fam}")
    lo = 0.8 * min(t["measured_min"].min(), t["predicted"].min())
    hi = 1.25 * max(t["measured_max"].max(), t["predicted"].max())
    line = np.array([lo, hi])
    floor = float(t["noise_floor_pct"].median()) / 100
    ax.plot(line, line, "k-", lw=0.8, label="y = x")
    ax.fill_between(line, line * (1 - floor), line * (1 + floor), color="0.85",
                    label=f"engine noise floor (median {100 * floor:.1f} %)")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="engine tokens/s (median of runs)",
           ylabel="simulator tokens/s", title="Simulator against engine")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
