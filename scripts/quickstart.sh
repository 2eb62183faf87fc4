#!/usr/bin/env bash
# From nothing to a trained Spanish model on a laptop CPU: create .venv, install, build the embedded Spanish
# corpus (Debian packages), train its tokenizer, pack it, pretrain configs/tiny_es.py, evaluate it and
# print a few Spanish continuations. Re-running skips finished data stages and resumes training.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data/es_default}
WORKDIR=${WORKDIR:-runs/tiny_es}

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
echo "== Installing (about a minute on a fresh machine)"
.venv/bin/python -m pip install --quiet -e .

echo "== Preparing the embedded Spanish corpus in ${DATA_DIR}"
.venv/bin/python scripts/prepare_data.py --output_dir="${DATA_DIR}" \
  --config.pack.seq_len=256 --config.tokenizer.vocab_size=8192 "$@"

echo "== Pretraining configs/tiny_es.py in ${WORKDIR} (TensorBoard: tensorboard --logdir ${WORKDIR})"
.venv/bin/python scripts/train.py --config=configs/tiny_es.py --workdir="${WORKDIR}" \
  --config.data.path="${DATA_DIR}" --alsologtostderr

echo "== Evaluating: bits-per-byte against a unigram baseline, Spanish tasks (${WORKDIR}/eval/report.md)"
.venv/bin/python scripts/evaluate.py --workdir="${WORKDIR}"

echo "== Spanish continuations"
.venv/bin/python scripts/sample.py --workdir="${WORKDIR}" --max_new_tokens=48 --temperature=0.7 \
  --prompt="En el principio" --prompt="El sistema operativo" --prompt="Había una vez"
