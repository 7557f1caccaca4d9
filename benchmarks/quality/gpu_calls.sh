#!/usr/bin/env bash
# The device calls behind the quality results (issue #16), one stage per call; run from the repository root on
# the GPU machine with .whl/ and data/prose carried (README.md in this folder says how to build both).
#
#   bash benchmarks/quality/gpu_calls.sh probe   # MQAR step time: one process alone, then 4 and 8 at once
#   bash benchmarks/quality/gpu_calls.sh text    # text_lm.py 30m (resumes runs/text_30m.json)
#   bash benchmarks/quality/gpu_calls.sh eval    # the offline lm-eval suite on the saved text models
#   bash benchmarks/quality/gpu_calls.sh mqar    # the target cells of MQAR, one process per run, in parallel
#   bash benchmarks/quality/gpu_calls.sh graphcheck  # --cuda-graph against eager on the same 400 steps
#   bash benchmarks/quality/gpu_calls.sh grid    # the full MQAR grid, one run per job, 4 workers per GPU, resumable
#   bash benchmarks/quality/gpu_calls.sh target1 # MQAR target 1 with --cuda-graph (2 lrs) beside graphcheck's pair
#   bash benchmarks/quality/gpu_calls.sh seeds   # one MQAR cell (MODELS, WIDTH, TASK) at SEEDS, one process each
#
# Everything lands in runs/ (kept between calls on a warm machine); what comes back is packed into one or two
# files of $OUT (a device call returns at most 8 files).
set -uo pipefail
stage=${1:?stage: probe, text, eval or mqar}
OUT=${OUT:-runs/out}
mkdir -p runs "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/runs/triton_cache \
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
Q=benchmarks/quality
R=$Q/results
finished() { cat "$@" | tr '\r' '\n' | grep '^\['; }  # the "[i/n] run: ..." lines (tqdm writes \r)

case $stage in
probe)
    # a run of 300 steps, alone and then 4 and 8 copies at once: does the GPU take parallel MQAR processes?
    common=(--grid full --widths 128 --tasks kv64_t512 --lrs 1.5e-3 --steps 300)
    python3 $Q/mqar.py "${common[@]}" --models pflow-r1 --out runs/probe_1.json > runs/probe_1.log 2>&1
    for n in 4 8; do
        for k in $(seq 1 $n); do
            python3 $Q/mqar.py "${common[@]}" --models pflow-r1 --out runs/probe_${n}_$k.json \
                > runs/probe_${n}_$k.log 2>&1 &
        done
        wait
    done
    python3 - <<'EOF'
import json, glob
for pattern in ("runs/probe_1.json", "runs/probe_4_*.json", "runs/probe_8_*.json"):
    rates = [next(iter(json.load(open(f))["runs"].values()))["tokens_per_s"] for f in sorted(glob.glob(pattern))]
    print(f"{pattern}: {len(rates)} processes, tokens/s each {[round(r / 1e6, 2) for r in rates]} M, "
          f"sum {sum(rates) / 1e6:.2f} M")
EOF
    ;;
text)
    [[ -f runs/text_30m.json ]] || cp $R/text_30m_h200/text_30m.json runs/ 2>/dev/null  # resume
    python3 $Q/text_lm.py data/prose --size 30m --tokens 30e6 --eval-every 50 --max-wall "${MAX_WALL:-300}" \
        --models pflow-r1,llama,pflow-r2-sum,pflow-r2-product,pflow-r4-sum \
        --out runs/text_30m.json --save-dir runs/text30m 2>&1 | grep -v 'it/s\]$'
    tar czf "$OUT/text_30m.tgz" runs/text_30m.json runs/text_30m.png
    ;;
graphcheck)
    M=(python3 $Q/mqar.py --grid full --widths 128 --lrs 1.5e-3 --steps 400 --eval-every 200)
    "${M[@]}" --models pflow-r1 --tasks kv64_t512 --out runs/gc_eager.json > runs/gc_eager.log 2>&1 &
    "${M[@]}" --cuda-graph --models pflow-r1 --tasks kv64_t512 --out runs/gc_graph.json > runs/gc_graph.log 2>&1 &
    "${M[@]}" --cuda-graph --models llama,pflow-r2-sum --tasks kv16_t256,kv64_t512 --out runs/gc_multi.json \
        > runs/gc_multi.log 2>&1 &
    wait
    python3 $Q/mqar_curves.py runs/gc_eager.json runs/gc_graph.json runs/gc_multi.json --out runs/gc_curves.png
    finished runs/gc_*.log
    tail -c 600 runs/gc_*.log
    tar czf "$OUT/graphcheck.tgz" runs/gc_*
    ;;
grid)
    # The full MQAR grid: 8 models x 3 widths x 3 learning rates per seed (SEEDS, default "0"), all three tasks
    # trained together, --cuda-graph, 25,000-step schedules stopping at 99 %. One run per job and per file
    # (runs/<NAME>/seed<S>_<model>_w<width>_lr<lr>.json): jobs whose file exists, here or among the results an
    # earlier call returned ($R/<NAME>_h200/), are done, unless their run was cut at a call's end (run again);
    # `mqar.py --merge` joins them (learning rates apart).
    # PER_GPU workers on every GPU of the machine (4 on an H200: a 25,000-step run of four at once takes ~7.5
    # minutes; 8 of the 5,000-step mix at widths 64 / 128 fit in its memory, 14 did not; at width 256, 5 fit and
    # 8 did not); a worker starts a job only with at least MIN_LEFT seconds of the call's CALL_WALL left, and
    # cuts it at the call's end (kept, `ended_by: run_wall`).
    # A smaller grid: NAME (default grid), TASK (tasks trained together, default the grid's three), WIDTHS
    # (64 128 256), LRS (default 1.5e-3 3e-3 5e-3; LRS_<width> for one width), STEPS, GRID_MODELS.
    gpus=$(nvidia-smi -L | wc -l)
    procs=$((gpus * ${PER_GPU:-4}))
    deadline=$(($(date +%s) + ${CALL_WALL:-560}))
    name=${NAME:-grid}
    tasks=(); [[ -n ${TASK:-} ]] && tasks=(--tasks "$TASK")
    mkdir -p runs/$name
    cp -n $R/${name}_h200/*.json runs/$name/ 2>/dev/null
    todo=()
    for seed in ${SEEDS:-0}; do
        for width in ${WIDTHS:-64 128 256}; do  # a width's cells first: a cut call leaves whole widths done
            for model in ${GRID_MODELS:-pflow-r1 pflow-r2-sum pflow-r4-sum pflow-r2-product pflow-r2-exact \
                pflow-r1-negeig llama llama-abspos}; do
                rates=LRS_$width
                for lr in ${!rates:-${LRS:-1.5e-3 3e-3 5e-3}}; do
                    file=runs/$name/seed${seed}_${model}_w${width}_lr$lr.json  # done unless absent or cut
                    if [[ ! -f $file ]] || grep -q '"ended_by": *"run_wall"' "$file"; then
                        todo+=("$seed $model $width $lr")
                    fi
                done
            done
        done
    done
    echo "${#todo[@]} jobs left; $procs workers on $gpus GPUs"
    worker() {
        local w=$1 i left seed model width lr
        for ((i = w; i < ${#todo[@]}; i += procs)); do
            left=$((deadline - $(date +%s)))
            ((left < ${MIN_LEFT:-480})) && break
            read -r seed model width lr <<< "${todo[i]}"
            CUDA_VISIBLE_DEVICES=$((w % gpus)) python3 $Q/mqar.py --grid full --steps "${STEPS:-25000}" \
                --lrs "$lr" --models "$model" --widths "$width" --seed "$seed" \
                "${tasks[@]}" --eval-every 1000 --stop-at 0.99 --cuda-graph --run-wall $((left - 40)) \
                --out "runs/$name/seed${seed}_${model}_w${width}_lr$lr.json" >> "runs/$name/worker$$_$w.log" 2>&1
        done
    }
    for w in $(seq 0 $((procs - 1))); do worker "$w" & done
    wait
    finished runs/$name/worker*.log
    for seed in ${SEEDS:-0}; do  # one table per seed: the best learning rate of each model, width and task
        python3 $Q/mqar.py --merge runs/$name/seed${seed}_*.json --out runs/${name}_merged_seed$seed.json \
            | tail -n 40
    done
    tar czf "$OUT/$name.tgz" runs/$name/*.json runs/$name/worker*.log $(ls runs/${name}_merged_* 2>/dev/null)
    ;;
eval)
    for dir in runs/text30m/*/; do
        name=$(basename "$dir")
        [[ -f runs/text30m_eval/$name/results.json ]] && continue
        python3 -m modeling_parallelflow eval "$dir" --device cuda --dtype bfloat16 --batch-size 16 \
            --limit "${LIMIT:-200}" --output-dir runs/text30m_eval/$name 2>&1 | grep -v '%|' | tail -25
    done
    python3 - <<'EOF'
import json, glob, os
rows = {}
for f in sorted(glob.glob("runs/text30m_eval/*/results.json")):
    rows[os.path.basename(os.path.dirname(f))] = json.load(open(f))
json.dump(rows, open(os.environ.get("OUT", "runs/out") + "/text30m_eval.json", "w"), indent=1, default=str)
EOF
    ;;
mqar)
    # the issue's target cells, each run its own process: MQAR steps are launch-bound, so they overlap on one GPU
    # (the probe on an H200: 1 process 3.2M tokens/s; 4 at once 2.3M each; 8 at once 1.3M each)
    steps=${STEPS:-12000}
    wall=${RUN_WALL:-470}
    launch() {  # tag, task, width, model, lr
        python3 $Q/mqar.py --grid full --tasks "$2" --widths "$3" --models "$4" --lrs "$5" --steps "$steps" \
            --eval-every 1000 --stop-at 0.99 --run-wall "$wall" --out "runs/mqar_$1.json" > "runs/mqar_$1.log" 2>&1 &
    }
    launch r1_w128_kv64_lr5e-4 kv64_t512 128 pflow-r1 5e-4
    launch r1_w128_kv64_lr1.5e-3 kv64_t512 128 pflow-r1 1.5e-3
    launch r2sum_w128_kv64_lr1.5e-3 kv64_t512 128 pflow-r2-sum 1.5e-3
    launch r1_w64_kv256_lr1.5e-3 kv256_t1024 64 pflow-r1 1.5e-3
    launch r2sum_w64_kv256_lr1.5e-3 kv256_t1024 64 pflow-r2-sum 1.5e-3
    wait
    finished runs/mqar_*.log
    tar czf "$OUT/mqar_runs.tgz" runs/mqar_*.json runs/mqar_*.log
    ;;
target1)
    # target 1 (R = 1, width 128, kv64_t512, >= 99 %) with --cuda-graph at two learning rates, beside graphcheck's
    # eager / graph pair (400 steps each), all at once
    G=(python3 $Q/mqar.py --grid full --widths 128 --tasks kv64_t512 --models pflow-r1)
    "${G[@]}" --lrs 1.5e-3 --steps 400 --eval-every 200 --out runs/gc_eager.json > runs/gc_eager.log 2>&1 &
    "${G[@]}" --lrs 1.5e-3 --steps 400 --eval-every 200 --cuda-graph --out runs/gc_graph.json > runs/gc_graph.log 2>&1 &
    for lr in 3e-3 5e-3; do
        "${G[@]}" --lrs $lr --steps "${STEPS:-20000}" --eval-every 1000 --stop-at 0.99 --cuda-graph \
            --run-wall "${RUN_WALL:-470}" --out runs/t1_lr$lr.json > runs/t1_lr$lr.log 2>&1 &
    done
    wait
    python3 $Q/mqar_curves.py runs/gc_eager.json runs/gc_graph.json runs/t1_lr*.json --out runs/t1_curves.png
    finished runs/gc_*.log runs/t1_*.log
    tar czf "$OUT/target1.tgz" runs/gc_* runs/t1_*
    ;;
seeds)
    # one cell, several seeds and models: target 1 parted from 98.1 % to 11.6 % with the schedule length alone
    # (b76ce2f), so a cell is its seeds' spread. One process per (model, seed), all at once, --cuda-graph, the
    # 17,000-step schedule of the 98.1 %. MODELS (default pflow-r1), WIDTH (128), TASK (kv64_t512, or a mix
    # trained together: kv4_t64,kv16_t256,kv64_t512), LR (3e-3), SEEDS (0-3).
    for model in ${MODELS:-pflow-r1}; do
        for seed in ${SEEDS:-0 1 2 3}; do
            tag=${model}_w${WIDTH:-128}_$(echo "${TASK:-kv64_t512}" | tr , +)_seed$seed
            python3 $Q/mqar.py --grid full --widths "${WIDTH:-128}" --tasks "${TASK:-kv64_t512}" --models $model \
                --lrs "${LR:-3e-3}" --steps "${STEPS:-17000}" --eval-every 1000 --stop-at 0.99 --cuda-graph \
                --seed $seed --run-wall "${RUN_WALL:-470}" --out runs/seeds_$tag.json > runs/seeds_$tag.log 2>&1 &
        done
    done
    wait
    python3 $Q/mqar_curves.py runs/seeds_*.json --out runs/seeds_curves.png
    finished runs/seeds_*.log
    tar czf "$OUT/seeds.tgz" runs/seeds_*
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
