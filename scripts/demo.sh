#!/usr/bin/env bash
# `make demo`: the whole product on a laptop CPU, offline, in a few minutes:
#   train configs/quickstart.yaml (SmolLM2-135M-Instruct + ABBA on GSM8K problems 50+)
#   -> abba eval on GSM8K problems [0, 10) (disjoint from training) -> abba merge into a plain HF model.
# Everything goes under runs/demo/. The demo removes that directory only if it made it (marker file);
# anything else there is left alone and the demo stops.
set -euo pipefail
cd "$(dirname "$0")/.."

ABBA=${ABBA:-.venv/bin/abba}
DEMO=${DEMO_DIR:-runs/demo}
MARKER="$DEMO/.made-by-abba-demo"

if [ -e "$DEMO" ]; then
    if [ -f "$MARKER" ]; then
        echo "removing the previous demo output $DEMO"
        rm -rf "$DEMO"
    else
        echo "error: $DEMO exists and was not made by this demo; move it away or set DEMO_DIR=..." >&2
        exit 2
    fi
fi
mkdir -p "$DEMO"
touch "$MARKER"

start=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - start )) s so far)"; }

step "1/3 train: configs/quickstart.yaml -> $DEMO/run"
"$ABBA" train configs/quickstart.yaml --set "output_dir=$DEMO/run"

step "2/3 eval: GSM8K problems [0, 10) with the trained adapter (merged in memory)"
"$ABBA" eval --task gsm8k --limit 10 --run "$DEMO/run" --out "$DEMO/eval"

step "3/3 merge: adapter folded into the base -> $DEMO/merged"
"$ABBA" merge --run "$DEMO/run" --out "$DEMO/merged"

echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "  run (adapter, config, metrics, checkpoints): $DEMO/run"
echo "  training loss per step:                      $DEMO/run/metrics.jsonl"
echo "  eval predictions and summary:                $DEMO/eval"
echo "  merged Hugging Face model:                   $DEMO/merged"
echo "  (AutoModelForCausalLM.from_pretrained(\"$DEMO/merged\") loads it without abba-cli)"
