#!/bin/bash
# Cloud TPU pod (v5p / v6e multi-host slice): run the same command on every worker.
#
#   launch/tpu_pod.sh TPU_NAME ZONE recipes/sparse.yaml --set mesh.fsdp=4 --set mesh.expert=8  # v5p-64
#
# Every worker runs `dsa-train train`; jax.distributed.initialize() discovers the slice from the TPU
# metadata (TPU_WORKER_HOSTNAMES names more than one host, so `dsa-train train` calls it).
# The repository must be at DSA_REPO_DIR (default ~/dsa-train) on every worker; the first run (or
# DSA_SETUP=1) creates .venv there and installs the TPU build (.[tpu,gcs]: jax with libtpu).
# train.run_dir on GCS (gs://...) or a disk every worker shares; data.paths there too: each worker
# copies a remote dataset once into data.cache_dir (its size must be free on every worker's disk).
set -euo pipefail
TPU_NAME=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE RECIPE [--set key=value ...]}
ZONE=${2:?zone, e.g. us-east5-a}
RECIPE=${3:?recipe, e.g. recipes/sparse.yaml}
shift 3
REPO_DIR=${DSA_REPO_DIR:-~/dsa-train}
ARGS=$(printf " %q" "$@")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  cd $REPO_DIR
  if [ ! -d .venv ] || [ '${DSA_SETUP:-0}' = 1 ]; then
    python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu,gcs]'
  fi
  source .venv/bin/activate
  export TPU_STDERR_LOG_LEVEL=0 TPU_MIN_LOG_LEVEL=0
  export LIBTPU_INIT_ARGS='--xla_tpu_enable_async_collective_fusion=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true'
  dsa-train train $RECIPE$ARGS 2>&1 | tee -a ~/dsa-train-\$(hostname).log
"
