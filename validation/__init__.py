"""The simulator checked against the engine (``python -m experiments.validate``).

A floor above both clocks: it calibrates a hardware profile from micro-benchmarks on the engine
(``real.calibration``, never from the runs it validates), measures a grid of configurations in the
engine with the measurement discipline of ``real.measurement``, predicts the same runs with the
simulator and that profile, and compares them.

- ``scenario``: the grid, a YAML file of named slices (one slice per model: a shape replay or a live model);
- ``store``: every result written atomically as it is made, keyed by what it depends on, so a run resumes;
- ``profile_fit``: the calibration's raw measurements turned into the profile's constants;
- ``engine_side``: a slice measured on the engine (GPU, or the CPU for the smoke run);
- ``sim_side``: the same runs predicted by the simulator;
- ``report``: validation.csv (long format), summary.txt and the predicted-against-measured plot.
"""
