#!/usr/bin/env bash
# The H100 runs' entry point, kept so that the commands in experiments/results/h100 still work: the flow
# is the same on any GPU (the profile is named after the GPU that measures it), so this is run_h200.sh.
exec "$(dirname "$0")/run_h200.sh" "$@"
