#!/usr/bin/env bash
# Installs the project on every host of a Cloud TPU VM slice and starts the same training command on all of them
# (`--worker=all`); `--distributed` makes each host call jax.distributed.initialize(), which finds its peers from
# the TPU metadata. The work directory and the data must be on a file system every host mounts (Filestore/NFS, or
# a bucket through gcsfuse): Orbax writes each checkpoint from all hosts, and every host reads its own rows.
#
#   TPU_NAME=es-v5p ZONE=us-east5-a bash scripts/launch/tpu_vm.sh \
#       configs/llama3_8b_es.py:v5p-64 /mnt/shared/runs/llama3_8b /mnt/shared/data/es_corpus [--config.X=Y ...]
#
# Check that the recipe fits before you pay for the slice:
#   python scripts/train.py --config=configs/llama3_8b_es.py:v5p-64 --dry_run --dry_run_devices=32 \
#       --dry_run_device_kind="TPU v5p"
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}" "${ZONE:?set ZONE to its zone}"
if (($# < 3)); then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG[:MACHINE] WORKDIR DATA_DIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2 data=$3
shift 3
repo=${REPO_URL:-$(git -C "$(dirname "$0")/../.." remote get-url origin)}
project=${PROJECT_DIR:-spanish-llm}  # where the project is cloned on each host, relative to the home directory

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

install="set -e; [ -d $project ] || git clone --quiet $repo $project; cd $project; git pull --quiet"
install+="; python3 -m venv .venv; .venv/bin/pip install --quiet -e . 'jax[tpu]==0.10.2'"
on_all_hosts "$install"
on_all_hosts "cd $project && .venv/bin/python scripts/train.py --config=$config --workdir=$workdir \
--config.data.path=$data --distributed $*"
