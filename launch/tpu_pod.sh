#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker; jax.distributed.initialize()
# auto-detects the pod. Data and workdir live in a bucket every worker reads.
#
#   bash launch/tpu_pod.sh my-tpu us-central2-b configs/reflow_sd15.py:stage2 gs://bucket/runs/reflow \
#       --config.data.path=gs://bucket/triplets/sd15
#
# Install once:  gcloud compute tpus tpu-vm ssh my-tpu --zone=ZONE --worker=all \
#   --command="git clone REPO instaflow-jax && cd instaflow-jax && pip install -e '.[tpu]' gcsfs"
set -euo pipefail
tpu=${1:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG[:VARIANT] WORKDIR [overrides]}
zone=${2:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG[:VARIANT] WORKDIR [overrides]}
config=${3:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG[:VARIANT] WORKDIR [overrides]}
workdir=${4:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG[:VARIANT] WORKDIR [overrides]}
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd instaflow-jax && python -m instaflow_jax.train --config '$config' --workdir '$workdir' \
    --config.distributed.enabled=True $*"
