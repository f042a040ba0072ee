"""SIGTERM handled as Ctrl-C in the engine commands.

``timeout``, batch schedulers and the device machine's call limit end a command with SIGTERM, whose default
action kills the process outright: no line said what was kept, and Python's ``finally`` blocks (which stop a
clock sampler, close a table) never ran. Inside ``sigterm_as_interrupt`` it raises KeyboardInterrupt instead,
so a command ends as it does on Ctrl-C (``real.bench.engine_runs.interrupt_exits``: one line, exit code 130,
every finished run kept).
"""
from __future__ import annotations

import contextlib
import signal


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM raises KeyboardInterrupt in the main thread; the previous handler is put
    back after it. (Only the main thread may set handlers: elsewhere the block runs unchanged.)"""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:          # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
