#!/usr/bin/env bash
# One GPU (or one CPU for the :tiny configs). JAX uses the single visible device.
#
#   bash launch/single_gpu.sh configs/reflow_sd15.py runs/reflow --config.data.path=triplets/sd15
#
# Extra arguments are config overrides. Re-running the same command resumes from the last checkpoint.
#
# Memory (SD 1.5 at 512², bf16 compute, float32 master weights; XLA's accounting of the compiled
# step, benchmarks/RESULTS.md): one 80 GB GPU holds batch 8 as it is, batch 48 with
# --config.remat=True. For the paper's batch of 64 on one GPU add --config.remat=True
# --config.grad_accum=2 (two micro-batches of 32), or --config.grad_accum=4 without remat.
set -euo pipefail
config=${1:?usage: single_gpu.sh CONFIG[:VARIANT] WORKDIR [--config.key=value ...]}
workdir=${2:?usage: single_gpu.sh CONFIG[:VARIANT] WORKDIR [--config.key=value ...]}
shift 2
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec python -m instaflow_jax.train --config "$config" --workdir "$workdir" "$@"
