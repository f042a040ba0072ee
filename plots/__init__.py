"""Figures from result tables and simulated timelines."""
from plots.figures import plot_hit_rate_vs_belady, plot_timeline, plot_tokens_vs_slots, plot_validation

__all__ = ["plot_hit_rate_vs_belady", "plot_timeline", "plot_tokens_vs_slots", "plot_validation"]
