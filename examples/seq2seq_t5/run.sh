#!/usr/bin/env bash
# Encoder-decoder fine-tuning end to end on CPU (a few minutes on 2 cores): a small T5 built from its config learns a
# synthetic summarization task, and ROUGE rises at each evaluation (metrics.jsonl, the step line, plot_run.py).
#
#     bash examples/seq2seq_t5/run.sh [WORK_DIR]
#
# With a real checkpoint the commands are the same: MODEL=/path/to/flan-t5-base bash examples/seq2seq_t5/run.sh
# (a local folder saved by save_pretrained, with its tokenizer), on your own {"source", "target"} rows (DATA=...).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/minitrain-seq2seq}
if [ -z "${MODEL:-}" ]; then
    python examples/seq2seq_t5/make_example.py "$WORK"
    MODEL=$WORK/tiny-t5
fi
TRAIN=${DATA:-$WORK/train.jsonl}
VALID=${VALID:-$WORK/valid.jsonl}
LIMITS=(--model-name-or-path "$MODEL" --source-prefix "summarize: " --max-source-tokens 64 --max-target-tokens 32
        --on-too-long truncate --num-workers 1)
python process_data.py --input-file "$TRAIN" --output-file "$WORK/train_rows.jsonl" "${LIMITS[@]}"
python process_data.py --input-file "$VALID" --output-file "$WORK/valid_rows.jsonl" "${LIMITS[@]}" \
    --num-printed-samples 0
python train.py --data-path "$WORK/train_rows.jsonl" --validation-data-path "$WORK/valid_rows.jsonl" \
    --model-name-or-path "$MODEL" --output-dir "$WORK/out" --fresh \
    --batch-size 32 --max-tokens-per-gpu 2048 --learning-rate 2e-3 --num-warmup-steps 20 --lr-scheduler linear \
    --max-steps 300 --eval-every-samples 800 --num-eval-generations 0 \
    --eval-metric rouge --eval-max-new-tokens 32 --early-stopping-metric rougeL --early-stopping-patience 3 \
    --min-samples-per-checkpoint 4800 --save-dtype float32
python -m minitrain.tools.plot_run "$WORK/out"
grep -o '"validation_rougeL": [0-9.]*' "$WORK/out/metrics.jsonl"
