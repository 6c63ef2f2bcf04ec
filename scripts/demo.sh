#!/usr/bin/env bash
# `make demo`: the whole product on a laptop CPU, offline, in a few minutes:
#   train configs/quickstart.yaml (SmolLM2-135M-Instruct + ABBA on the bundled commonsense sets, rows 200+)
#   -> abba eval of the untuned base and of the trained adapter on held-out questions (rows [0, 15) of four sets)
#   -> abba merge into a plain HF model -> a before/after table.
# Everything goes under runs/demo/. The demo removes that directory only if it made it (marker file);
# anything else there is left alone and the demo stops.
# Overridable (tests run the demo on a tiny model this way): ABBA, PY, DEMO_DIR, DEMO_CONFIG, DEMO_BASE (the base
# model the "before" column evaluates), DEMO_TASKS, DEMO_LIMIT, DEMO_MAX_NEW_TOKENS, DEMO_SET (extra
# "--set key=value" words for training, space-separated).
set -euo pipefail
cd "$(dirname "$0")/.."

ABBA=${ABBA:-.venv/bin/abba}
PY=${PY:-.venv/bin/python}
DEMO=${DEMO_DIR:-runs/demo}
CONFIG=${DEMO_CONFIG:-configs/quickstart.yaml}
BASE=${DEMO_BASE:-HuggingFaceTB/SmolLM2-135M-Instruct}
TASKS=${DEMO_TASKS:-piqa,siqa,winogrande,obqa}
LIMIT=${DEMO_LIMIT:-15}
MAX_NEW=${DEMO_MAX_NEW_TOKENS:-16}
read -r -a SETS <<< "${DEMO_SET:-}"
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
eval_args=(--task "$TASKS" --limit "$LIMIT" --skip 0 --max-new-tokens "$MAX_NEW")

step "1/4 train: $CONFIG -> $DEMO/run"
set_args=(--set "output_dir=$DEMO/run")
for kv in "${SETS[@]}"; do set_args+=(--set "$kv"); done
"$ABBA" train "$CONFIG" "${set_args[@]}"

step "2/4 eval before: the untuned base model on $TASKS, rows [0, $LIMIT) of each (never trained on)"
"$ABBA" eval --model "$BASE" "${eval_args[@]}" --out "$DEMO/eval_base"

step "3/4 eval after: the trained adapter (merged in memory) on the same questions"
"$ABBA" eval --run "$DEMO/run" "${eval_args[@]}" --out "$DEMO/eval"

step "4/4 merge: adapter folded into the base -> $DEMO/merged"
# fp32: the merged model then matches base + adapter to 5e-5 of the logits; a bf16 merge passes its check too
# (every layer exactly round(W0 + dW)), but its rounding moves a trained SmolLM2 adapter's logits by ~9%.
"$ABBA" merge --run "$DEMO/run" --out "$DEMO/merged" --dtype fp32

echo
"$PY" - "$DEMO/eval_base" "$DEMO/eval" "$TASKS" <<'PYEOF'
import json
import sys
from pathlib import Path

before, after, tasks = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")


def row(root: Path, task: str) -> tuple[int, int, int]:
    m = json.loads((root / task / "metrics.json").read_text())
    return m["correct"], m["n"], m.get("invalid", 0)


print("held-out questions: accuracy (no extractable answer)")
print(f"| {'task':<10} | {'n':>3} | {'base model':>16} | {'trained adapter':>16} |")
print(f"|{'-' * 12}|{'-' * 5}|{'-' * 18}|{'-' * 18}|")
totals = [0, 0, 0, 0, 0]
for task in tasks:
    cb, n, ib = row(before, task)
    ca, _, ia = row(after, task)
    totals = [t + v for t, v in zip(totals, (cb, ca, n, ib, ia), strict=True)]
    print(f"| {task:<10} | {n:>3} | {100 * cb / n:5.1f}% ({ib:>3} inv) | {100 * ca / n:5.1f}% ({ia:>3} inv) |")
cb, ca, n, ib, ia = totals
print(f"| {'all':<10} | {n:>3} | {100 * cb / n:5.1f}% ({ib:>3} inv) | {100 * ca / n:5.1f}% ({ia:>3} inv) |")
PYEOF

echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "  run (adapter, config, metrics, checkpoints): $DEMO/run"
echo "  training and validation loss per step:        $DEMO/run/metrics.jsonl"
echo "  eval predictions and summaries:              $DEMO/eval_base (before), $DEMO/eval (after)"
echo "  merged Hugging Face model:                   $DEMO/merged"
echo "  (AutoModelForCausalLM.from_pretrained(\"$DEMO/merged\") loads it without abba-cli)"
echo "A few dozen steps mostly teach the answer format and the label prior; benchmarks/RESULTS.md has the"
echo "longer ABBA vs LoRA comparison."
