#!/usr/bin/env bash
# Short CPU version of the ABBA paper's fine-tuning comparison (Tables 1-2) at equal trainable parameters:
# SmolLM2-135M-Instruct with ABBA r1=r2=8, LoRA r=16, HiRA r=16 (all seven projections) and full fine-tuning,
# plus the untuned base model, on two settings (configs/repro/{math,commonsense}_*.yaml):
#   math         train on bundled GSM8K test problems [100, ...), evaluate GSM8K problems [0, eval.limit)
#   commonsense  train on commonsense_bundled_train, evaluate the first eval.limit rows of the eight sets
# Every run goes through the product itself (`abba train`, `abba eval`), sequentially (the machine has 2 cores).
# Writes runs/repro/<setting>/<method>/ and the table experiments/results/lm_repro_cpu.md.
#
#   experiments/repro_cpu.sh                      # everything (about 70 min on the busy shared 2-core CPU)
#   SETTINGS=commonsense METHODS="abba lora" experiments/repro_cpu.sh
#   REPRO_ROOT=runs/repro2 experiments/repro_cpu.sh train.seed=1 data.seed=1   # another seed (KEY=VALUE overrides)
#   REPRO_PREFIX=gpu_ REPRO_ROOT=runs/repro_gpu TABLE=experiments/results/lm_repro_gpu.md experiments/repro_cpu.sh
#                                             # the longer GPU version (configs/repro/gpu_*.yaml)
# A run directory that already holds a finished run (or eval results) is reused, so an interrupted script
# picks up where it stopped; delete runs/repro to start over.
set -euo pipefail
cd "$(dirname "$0")/.."

ABBA=${ABBA:-.venv/bin/abba}
PY=${PY:-.venv/bin/python}
ROOT=${REPRO_ROOT:-runs/repro}
SETTINGS=${SETTINGS:-"commonsense math"}
METHODS=${METHODS:-"abba lora hira full"}
TABLE=${TABLE:-experiments/results/lm_repro_cpu.md}
PREFIX=${REPRO_PREFIX:-}   # configs/repro/${PREFIX}<setting>_<method>.yaml
THREADS=${REPRO_THREADS:-2}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
EXTRA=("$@")  # KEY=VALUE overrides for every training run (passed as --set KEY=VALUE)

start=$(date +%s)
log() { echo "== $* ($(( $(date +%s) - start )) s so far)"; }
mkdir -p "$ROOT"
{ echo "started $(date -u +%FT%TZ) on $(nproc --all) CPU(s), threads=$THREADS, $(uname -m)"; echo "extra: ${EXTRA[*]:-none}"; } > "$ROOT/machine.txt"

# The base model is evaluated in fp32 like the trained runs (their configs say model.dtype float32; the bundled
# copy is stored in bf16), so the comparison differs only in the weights. Converted once.
BASE=$ROOT/base-fp32
if [ ! -f "$BASE/config.json" ]; then
    log "base model -> fp32 copy $BASE"
    "$PY" - "$BASE" <<'PYEOF'
import sys
from abba_cli.util.files import atomic_directory
from abba_cli.models.loading import load_base
model, tok = load_base("HuggingFaceTB/SmolLM2-135M-Instruct", "float32")
with atomic_directory(sys.argv[1]) as tmp:
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
PYEOF
fi

for setting in $SETTINGS; do
    first_cfg=configs/repro/${PREFIX}${setting}_abba.yaml
    # The untuned base model, with the same eval settings as the trained runs (read from the ABBA config).
    read -r tasks limit mnt bs < <("$PY" - "$first_cfg" <<'PYEOF'
import sys
from abba_cli.config import load_config
e = load_config(sys.argv[1]).eval
print(",".join(e.tasks), e.limit, e.max_new_tokens or 0, e.batch_size)
PYEOF
)
    mkdir -p "$ROOT/$setting"
    base_out=$ROOT/$setting/base/eval
    if [ ! -f "$base_out/${tasks##*,}/metrics.json" ]; then
        log "$setting: eval base model"
        mnt_arg=(); [ "$mnt" != 0 ] && mnt_arg=(--max-new-tokens "$mnt")
        "$ABBA" eval --model "$BASE" --task "$tasks" --limit "$limit" --skip 0 \
            --batch-size "$bs" "${mnt_arg[@]}" --out "$base_out" --resume > "$ROOT/$setting/base.eval.log" 2>&1
    fi
    for method in $METHODS; do
        cfg=configs/repro/${PREFIX}${setting}_${method}.yaml
        run=$ROOT/$setting/$method
        if [ ! -f "$run/adapter_model.safetensors" ] && [ ! -f "$run/model/config.json" ]; then
            rm -rf "$run"  # an unfinished run from an interrupted script
            log "$setting: train $method ($cfg)"
            "$ABBA" train "$cfg" --set "output_dir=$run" "${EXTRA[@]/#/--set=}" > "$run.train.log" 2>&1 \
                || { echo "training failed: see $run.train.log" >&2; exit 1; }
        fi
        if [ ! -f "$run/eval/${tasks##*,}/metrics.json" ]; then
            log "$setting: eval $method"
            # Tasks, limit, skip, batch size and max_new_tokens come from the run's own config.yaml.
            "$ABBA" eval --run "$run" --resume > "$run.eval.log" 2>&1 || { echo "eval failed: see $run.eval.log" >&2; exit 1; }
        fi
    done
done

log "table"
"$PY" -m experiments.lm_repro_table --root "$ROOT" --out "$TABLE"
echo "finished $(date -u +%FT%TZ), $(( $(date +%s) - start )) s" >> "$ROOT/machine.txt"
log "done: $TABLE"
