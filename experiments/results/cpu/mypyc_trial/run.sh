#!/usr/bin/env bash
# Issue 15's mypyc trial: how much faster the reference path gets with the shared core's bookkeeping
# (offload/cache.py, copy_queue.py, controller.py) compiled by mypyc, the policies and the clock left in
# Python. Not part of the toolkit: a measurement, reproducible from the repository root.
#   pip install mypy            # provides mypyc; needs a C compiler
#   bash experiments/results/cpu/mypyc_trial/run.sh [REPEATS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../../../.." && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
git -C "$root" archive HEAD | tar -x -C "$work"
(cd "$work" && patch -s -p1 < "$here/mypyc.patch" && mypyc offload/cache.py offload/copy_queue.py offload/controller.py >/dev/null)
for i in $(seq "${1:-3}"); do       # interleaved: pure Python, then compiled
  for tree in "$root" "$work"; do
    kind=python; [ "$tree" = "$work" ] && kind=mypyc
    echo "$kind: $(cd "$tree" && PYTHONPATH="$tree" python "$here/bench_reference.py" | tr '\n' ' ')"
  done
done
