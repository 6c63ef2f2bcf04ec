#!/usr/bin/env bash
# ABBA vs LoRA vs HiRA at equal trainable parameters on the SmolLM2 commonsense setting
# (configs/repro/compare_{abba,lora,hira}.yaml), every run through the product (`abba train`, `abba eval`).
#
#   scripts/compare_cpu.sh sweep     # ABBA scale s in {2, 8, 32, 64, 128} and LoRA lr in {3e-4, 1e-3, 3e-3},
#                                    # SWEEP_STEPS steps each, judged on held-out loss only
#                                    # (benchmarks/heldout_loss.py: rows [150, 182) of each set, 256 examples)
#   ABBA_ALPHA=8 LORA_LR=1e-3 scripts/compare_cpu.sh final
#                                    # the chosen settings, seeds SEEDS, 150 steps, validation loss every 25
#                                    # steps, then `abba eval` on 400 held-out questions
#   scripts/compare_cpu.sh table     # benchmarks/compare_table.py: curves, means, spreads, accuracy CIs
#
# JOBS runs go side by side with THREADS torch threads each (default 2 x 1 on a 2-core machine). A run that
# already finished is reused, so an interrupted script picks up where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

ABBA=${ABBA:-.venv/bin/abba}
PY=${PY:-.venv/bin/python}
ROOT=${COMPARE_ROOT:-runs/compare}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
SWEEP_STEPS=${SWEEP_STEPS:-60}
SEEDS=${SEEDS:-"1 2 3"}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$ROOT"

# One job: NAME CONFIG [KEY=VALUE ...] -> $ROOT/NAME (train, then eval unless NO_EVAL=1).
job() {
    local name=$1 cfg=$2; shift 2
    local run=$ROOT/$name sets=()
    mkdir -p "$(dirname "$run")"
    for kv in "$@"; do sets+=(--set "$kv"); done
    if [ ! -f "$run/adapter_model.safetensors" ]; then
        rm -rf "$run"
        "$ABBA" train "$cfg" --set "output_dir=$run" "${sets[@]}" > "$run.train.log" 2>&1 \
            || { echo "training failed: $run.train.log" >&2; return 1; }
    fi
    if [ "${NO_EVAL:-0}" != 1 ] && [ ! -f "$run/eval/obqa/metrics.json" ]; then
        "$ABBA" eval --run "$run" > "$run.eval.log" 2>&1 || { echo "eval failed: $run.eval.log" >&2; return 1; }
    fi
    echo "done $name"
}
export -f job
export ABBA ROOT

case "${1:-}" in
sweep)
    # paper scaling at r1 = r2 = 8: s = alpha^2 / 8
    {
        for s_alpha in 2:4 8:8 32:16 64:22.627417 128:32; do
            echo "sweep/abba_s${s_alpha%%:*} configs/repro/compare_abba.yaml adapter.alpha=${s_alpha##*:} train.max_steps=$SWEEP_STEPS"
        done
        for lr in 3e-4 1e-3 3e-3; do
            echo "sweep/lora_lr$lr configs/repro/compare_lora.yaml train.lr=$lr train.max_steps=$SWEEP_STEPS"
        done
    } | NO_EVAL=1 xargs -P "$JOBS" -L 1 bash -c 'job "$@"' _
    mkdir -p "$ROOT/sweep"
    OMP_NUM_THREADS=2 "$PY" benchmarks/heldout_loss.py "$ROOT"/sweep/*/ --limit 32 --out "$ROOT/sweep/heldout.json"
    ;;
final)
    : "${ABBA_ALPHA:?set ABBA_ALPHA (chosen by the sweep)}" "${LORA_LR:?set LORA_LR (chosen by the sweep)}"
    {
        # abba: the sweep's choice (ABBA_ALPHA); abba_default: the product's default scale (compare_abba.yaml's
        # alpha), so the table shows both; lora: the sweep's lr; hira: its own paper's settings.
        for seed in $SEEDS; do
            for m in abba abba_default lora hira; do
                extra="train.seed=$seed data.seed=$seed"
                cfg=configs/repro/compare_${m%_default}.yaml
                [ $m = abba ] && extra="$extra adapter.alpha=$ABBA_ALPHA"
                [ $m = lora ] && extra="$extra train.lr=$LORA_LR"
                echo "final/${m}_seed$seed $cfg $extra${FINAL_EXTRA:+ $FINAL_EXTRA}"  # no trailing blank: xargs -L joins such lines
            done
        done
    } | xargs -P "$JOBS" -L 1 bash -c 'job "$@"' _
    # The untuned base on the same questions, in fp32 like the trained runs (the bundled copy is stored in bf16).
    if [ ! -f "$ROOT/base/eval/obqa/metrics.json" ]; then
        [ -f "$ROOT/base-fp32/config.json" ] || "$PY" - "$ROOT/base-fp32" <<'PYEOF'
import sys
from abba_cli.fsutil import atomic_directory
from abba_cli.models import load_base
model, tok = load_base("HuggingFaceTB/SmolLM2-135M-Instruct", "float32")
with atomic_directory(sys.argv[1]) as tmp:
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
PYEOF
        "$ABBA" eval --model "$ROOT/base-fp32" --task boolq,piqa,siqa,hellaswag,winogrande,arc_e,arc_c,obqa \
            --skip 0 --limit 50 --max-new-tokens 16 --batch-size 16 --out "$ROOT/base/eval" > "$ROOT/base.eval.log" 2>&1
    fi
    ;;
table)
    "$PY" benchmarks/compare_table.py --root "$ROOT" --out benchmarks/results/compare_cpu.md
    ;;
*)
    echo "usage: scripts/compare_cpu.sh sweep|final|table" >&2
    exit 2
    ;;
esac
