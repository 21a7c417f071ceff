#!/usr/bin/env bash
# One GPU (or one CPU for the :tiny configs). JAX uses the single visible device.
#
#   bash launch/single_gpu.sh configs/reflow_sd15.py runs/reflow --config.data.path=triplets/sd15
#
# Extra arguments are config overrides. Re-running the same command resumes from the last checkpoint.
set -euo pipefail
config=${1:?usage: single_gpu.sh CONFIG[:VARIANT] WORKDIR [--config.key=value ...]}
workdir=${2:?usage: single_gpu.sh CONFIG[:VARIANT] WORKDIR [--config.key=value ...]}
shift 2
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec python -m instaflow_jax.train --config "$config" --workdir "$workdir" "$@"
