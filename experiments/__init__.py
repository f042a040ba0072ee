"""Command-line entry points and their building blocks: configurations, runs, result tables.

``python -m experiments.sweep cache_slots=4..8`` sweeps a grid of configurations in the simulator.
"""
