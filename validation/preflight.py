"""What a measuring call needs of each slice, checked before anything runs: a slice's trace (read whole: one cut
short or damaged; a replay's, one of another model than its shape, ``Trace.for_shape``), a live slice's checkpoint
(its config.json and the headers of its weight files), its tokenizer and corpus, its lookahead gate, and whether the
slice's weights fit in the host memory available. A slice's inputs are otherwise read only when the slice starts, after the slices before it have run for minutes on a device.

The scenario's own checks (``validation.scenario``) cover what every call needs; these are the inputs only a
measurement reads (``--predict-only`` and ``--timelines`` need no checkpoint, corpus or gate).
"""
from __future__ import annotations

from pathlib import Path

from real.bench.args import host_memory_error
from real.bench.text import load_text
from real.checkpoint import CONFIG_NAME, CheckpointError, check_weight_headers, read_config, weight_quantization
from traces import load_trace
from traces.io import TraceError
from validation.scenario import Slice


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def slice_problems(sl: Slice, device_type: str, scenario: str) -> list[str]:
    """One line per input of ``sl`` a measurement on ``device_type`` ('cuda' or 'cpu') could not use, each naming
    the slice, the path and the fix; [] when there is none."""
    where = f"slice {sl.name} of {scenario}"
    problems, shape, checkpoint = [], None, None
    if sl.trace is not None:        # (its existence is the scenario's check) a replay reads it when the slice starts
        try:
            trace = load_trace(sl.trace)
        except TraceError as err:
            problems.append(f"{where}: trace: {_one_line(err)} (a committed trace: git checkout -- {sl.trace}; or "
                            f"give the slice another 'trace')")
        else:
            if sl.mode == "replay":     # the routing is cut to the slice's shape (Trace.for_shape) when it starts
                try:
                    trace.for_shape(sl.model_shape())
                except ValueError as err:
                    problems.append(f"{where}: trace {sl.trace} does not fit shape {sl.shape or 'of the trace'}: "
                                    f"{_one_line(err)}; give the slice a trace of that shape, or a 'shape' (or "
                                    f"'layers') its routing covers")
    if sl.mode == "live" and sl.model != "random":
        path = Path(sl.model)
        try:
            config, config_dict = read_config(path)
            weight_quantization(config_dict, path / CONFIG_NAME)
            check_weight_headers(path)
            shape, checkpoint = config.to_model_shape(path.name), path
        except CheckpointError as err:
            problems.append(f"{where}: model: {_one_line(err)} (or give the slice another 'model')")
    if sl.mode == "live" and sl.corpus:
        if not Path(sl.corpus).is_dir():
            problems.append(f"{where}: corpus {sl.corpus} is not a directory; pass the text corpus "
                            f"(../shared/data/corpus) with --corpus, or fix the slice's 'corpus'")
        elif checkpoint is not None:        # a random-weight model's prompts are random token ids
            try:
                load_text(checkpoint, Path(sl.corpus))
            except FileNotFoundError as err:        # the corpus lacks files
                problems.append(f"{where}: corpus: {_one_line(err)}")
            except (OSError, ValueError) as err:    # no tokenizer in the checkpoint folder
                problems.append(f"{where}: model {checkpoint}: no tokenizer loads from it ({type(err).__name__}); "
                                f"save the model's tokenizer into the folder (tokenizer.save_pretrained)")
    if sl.mode == "live" and sl.gate is not None and not Path(sl.gate).is_dir():
        problems.append(f"{where}: gate {sl.gate} is not a directory; train one with python -m experiments.train_gate "
                        f"(after experiments.record), or drop the slice's 'gate'")
    if shape is None and not (sl.mode == "live" and sl.model != "random"):
        shape = sl.model_shape()
    if shape is not None:
        # the engine runs bfloat16 on a GPU (experts on the host), float32 on a CPU (every weight on the host)
        memory = host_memory_error(shape, 2 if device_type == "cuda" else 4, device_type)
        if memory is not None:
            problems.append(f"{where}: {memory} (in the scenario: give the slice fewer 'layers' or a smaller "
                            f"'shape')")
    return problems


def input_problems(slices, device_type: str, scenario: str) -> list[str]:
    """``slice_problems`` of every slice, in order."""
    return [line for sl in slices for line in slice_problems(sl, device_type, scenario)]
