#!/usr/bin/env bash
# All GPUs of one host, data parallel: one process drives every local GPU (no torchrun needed);
# the global batch is split over them. Add --config.fsdp=True to shard parameters and optimizer
# state when memory is short.
#
#   bash launch/multi_gpu.sh configs/reflow_sd15.py runs/reflow --config.batch_size=64
set -euo pipefail
config=${1:?usage: multi_gpu.sh CONFIG[:VARIANT] WORKDIR [--config.key=value ...]}
workdir=${2:?usage: multi_gpu.sh CONFIG[:VARIANT] WORKDIR [--config.key=value ...]}
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec python -m instaflow_jax.train --config "$config" --workdir "$workdir" "$@"
