#!/usr/bin/env bash
# The README's fine-tuning demo: 3-way Spanish sentiment (llm/eval/data), trained on its train split
# and scored on its whole test split (macro-F1), zero-shot vs prompt tuning vs LoRA on the quickstart model.
# Needs the quickstart's run and tokenizer (bash scripts/quickstart.sh); about 15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-runs/tiny_es}
TOKENIZER=${TOKENIZER:-data/es_default/tokenizer.model}
OUT=${OUT:-runs/sentiment_demo}
PY=.venv/bin/python
for needed in "${BASE}/config.json" "${TOKENIZER}"; do
  [ -e "${needed}" ] || { echo "Missing ${needed}: run bash scripts/quickstart.sh first." >&2; exit 1; }
done
mkdir -p "${OUT}"

echo "== Sentiment rows (the evaluation's zero-shot prompt + label) in data/sentiment_es"
${PY} scripts/prepare_sentiment_tuning.py --tokenizer="${TOKENIZER}" --output_dir=data/sentiment_es --overwrite

for method in prompt_tuning lora; do
  echo "== Training ${method} on the frozen ${BASE}"
  ${PY} scripts/train.py --config="configs/${method}_sentiment_es.py" --workdir="${OUT}/${method}" \
    --config.init_from="${BASE}"
done

EVAL="--tasks=sentiment --num_shots=0 --max_examples=-1 --nomodel_card"
${PY} scripts/evaluate.py --workdir="${BASE}" ${EVAL} --output="${OUT}/zero_shot.json"
for method in prompt_tuning lora; do
  ${PY} scripts/evaluate.py --workdir="${OUT}/${method}" ${EVAL} --output="${OUT}/${method}.json"
done
${PY} scripts/compare_reports.py zero-shot="${OUT}/zero_shot.json" prompt-tuning="${OUT}/prompt_tuning.json" \
  lora="${OUT}/lora.json" --output="${OUT}/comparison.md"
