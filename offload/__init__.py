"""The shared offload core, below both clocks: no SimPy, no CUDA.

The policy interface, the expert cache and its read-only view, the copy queue, the controller,
next-use precomputation, trace-driven predictors, the run's assembly (``session``), the per-layer
protocol every clock walks (``layer_turn``) and the one metrics vocabulary (``metrics``).
"""
