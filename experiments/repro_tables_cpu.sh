#!/bin/bash
# The paper's tables at a CPU's scale (SmolLM2-135M, offline): each table's `abba compare` command from
# configs/repro/README.md with 40 steps of 1 example, validation loss at the end on 48 held-out examples, 10
# questions per commonsense task, two seeds. Sequential (2 cores); rerunning resumes. Then tabulate with
# `python -m experiments.repro_tables_cpu`.
set -u
C="configs/repro/compare_abba.yaml --seeds 2 --set train.max_steps=40 --set train.eval_every=40 --set eval.limit=10"
run() { name=$1; shift; echo "=== $name $(date +%T)"; abba compare $C "$@" --out runs/cpu/$name > runs/cpu/$name.log 2>&1; }
mkdir -p runs/cpu
run table1 --methods lora,rslora,pissa,dora,lora_pro,hira,abba
run table6 --methods abba --sweep adapter.ranks=[8,8],[4,4,4,4] --sweep adapter.alpha=4.76
run table3 --methods abba --sweep adapter.init=svd,random,svd_second,svd_minor,svd_zero_a2,svd_a2
run table4 --methods abba --sweep adapter.alpha=4,8,16,32
run table5 --methods abba --sweep adapter.ranks=[2,14],[4,12],[8,8]
run table8 --methods abba --sweep adapter.ranks=[4,4],[8,8],[16,16]
run figure3 --methods abba --sweep adapter.target_modules=[q_proj,k_proj,v_proj],[gate_proj,up_proj,down_proj],[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]
