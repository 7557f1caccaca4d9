#!/usr/bin/env bash
# The device calls behind the speed results (issues #11, #12, #15), one stage per call; run from the repository
# root on the GPU machine with .whl/ carried (fla, liger-kernel: benchmarks/README.md says how to fetch them).
#
#   bash benchmarks/gpu_calls.sh kernels   # per-kernel profile, the sweep subset, then the `table` stage
#   bash benchmarks/gpu_calls.sh model     # training step tokens/s and memory, 340M, both shapes, one process
#   bash benchmarks/gpu_calls.sh model13b  # the same at the 1.3B shape (PFlow R = 1, fla, Llama)
#   bash benchmarks/gpu_calls.sh generate  # decode-kernel GPU tests, fused vs unfused A/B, PFlow's generate()
#                                          # grid: B 1/8/64, prompts 512/8K/32K
#   bash benchmarks/gpu_calls.sh llama13b  # the Llama's generate() grid, then model13b with R = 2, 4 added
#   bash benchmarks/gpu_calls.sh fusions   # b019b45's training glue against --ablate of it, fla beside (1.3B)
#   bash benchmarks/gpu_calls.sh convtune  # the conv backward's launch settings, then the 1.3B step with the
#                                          # defaults (and fla) and with the fastest settings
#   bash benchmarks/gpu_calls.sh opcheck   # after a kernel change: the sweep subset, then the op at 2048 x 16 and
#                                          # 16384 x 2 with fla beside (VARIANTS, KERNELS_FOR, SWEEP_TUNE)
#   bash benchmarks/gpu_calls.sh table     # the public op against fla and SDPA: 4 shapes, R 1 / 2 / 4
#   bash benchmarks/gpu_calls.sh scancfg   # the sequential kernels' pipeline stages and V block at 16384 x 2
#   bash benchmarks/gpu_calls.sh ncu       # Nsight Compute counters of every kernel of one fwd+bwd (ours, fla) at
#                                          # SHAPE (16384 x 2): bound by L2, DRAM, or latency (Firecracker only)
#   bash benchmarks/gpu_calls.sh offsets   # the glue kernels' GPU tests (tensors past 2**31 elements), the
#                                          # B = 64 x 32K generate rows that hit them, and fla's 512 rows
#
# Each step is time-boxed (`timeout`), and every script writes its JSON as rows come in, so a cut call keeps
# what it measured. What comes back is one tar per stage in $OUT (a device call returns at most 8 files).
set -uo pipefail
stage=${1:?stage: kernels, table, model, model13b, generate, llama13b, fusions, convtune, opcheck, scancfg, ncu or offsets}
OUT=${OUT:-runs/out}
mkdir -p runs "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/runs/triton_cache
B=benchmarks
box() { local seconds=$1; shift; timeout --signal=INT --kill-after=20 "$seconds" "$@"; echo "rc=$? $*" >&2; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader

case $stage in
kernels)
    box 90 python3 $B/profile_kernels.py --shape 2048x16 --variants base --providers ours_R1_sum,fla_delta_rule_R1 \
        --out runs/profile_2048x16.json > runs/profile_2048x16.log 2>&1
    box 150 python3 $B/gpu_sweep.py --filter '^(tensor_inv|sigdelta)-.*-R(1|3|8)-K(16|48|128|256)-' --workers 4 \
        --out runs/sweep_subset.json > runs/sweep_subset.log 2>&1
    tail -n 3 runs/*.log
    tar czf "$OUT/kernels.tgz" runs/profile_* runs/sweep_subset.*
    ;&
table)
    # the public op: accuracy against the float64 loop (fla's error beside ours), then the timing table
    box ${TABLE_WALL:-300} python3 $B/bench_delta_rule.py --only check,bench --shapes 2048x16,4096x8,8192x4,16384x2 \
        --providers ours_R1_sum,ours_R2_sum,ours_R4_sum,fla_delta_rule_R1,fla_delta_product_R2,fla_delta_product_R4,sdpa_causal \
        --out runs/op.json > runs/op.log 2>&1
    tail -n 30 runs/op.log
    tar czf "$OUT/table.tgz" runs/op.*
    ;;
model)
    box 390 python3 $B/bench_model.py --sizes 340m --shapes 2048x16,8192x4 \
        --models pflow_r1,fla_deltanet,llama_sdpa,pflow_r2,pflow_r4 --out runs/model.json > runs/model.log 2>&1
    grep -h '340m/' runs/model*.log
    tar czf "$OUT/model.tgz" runs/model*
    ;;
model13b)
    box 540 python3 $B/bench_model.py --sizes 1.3b --shapes 2048x16,8192x4 \
        --models pflow_r1,fla_deltanet,llama_sdpa --out runs/model13b.json > runs/model13b.log 2>&1
    grep -h '1.3b/' runs/model13b.log
    tar czf "$OUT/model13b.tgz" runs/model13b*
    ;;
generate)
    # the fused decode kernel's GPU tests (against the unfused path, fp32 / bf16, B 1 / 64) and CUDA graphs
    box 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_decode.py tests/test_static_cache.py \
        > runs/gpu_decode_tests.log 2>&1
    # A/B: the unfused mixer decode (PFLOW_FUSED_DECODE is read at import, so its own process)
    PFLOW_FUSED_DECODE=0 box 70 python3 $B/bench_generate.py --providers 'pflow-r1 static+graphs' --batches 1,8 \
        --prompts 512 --out runs/generate_unfused.json > runs/generate_unfused.log 2>&1
    # a fresh model per cell (bench_generate)
    box 200 python3 $B/bench_generate.py --providers 'pflow-r1 static+graphs,pflow-r4 static+graphs' \
        --out runs/generate.json > runs/generate.log 2>&1
    tail -n 4 runs/gpu_decode_tests.log
    tail -n 30 runs/generate*.log
    tar czf "$OUT/generate.tgz" runs/gpu_decode_tests.log runs/generate*
    ;;
llama13b)
    # the Llama's generate grid (static cache + torch.compile, recompiled per cell), then the 1.3B training step
    box 230 python3 $B/bench_generate.py --providers 'llama static+compile' \
        --out runs/generate_llama.json > runs/generate_llama.log 2>&1
    box 330 python3 $B/bench_model.py --sizes 1.3b --shapes 2048x16,8192x4 \
        --models pflow_r1,fla_deltanet,llama_sdpa,pflow_r2,pflow_r4 --out runs/model13b.json > runs/model13b.log 2>&1
    tail -n 12 runs/generate_llama.log
    grep -h '1.3b/' runs/model13b.log
    tar czf "$OUT/llama13b.tgz" runs/generate_llama* runs/model13b*
    ;;
fusions)
    # b019b45's training glue (shared-input projections, Liger's fused add + RMSNorm) against the same code with
    # both switched off (--ablate), fla in the same process as the first (its first run autotunes: minutes)
    box 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_liger_layers.py tests/test_triton_glue.py \
        > runs/gpu_glue_tests.log 2>&1
    box 360 python3 $B/bench_model.py --sizes 1.3b --shapes 2048x16,8192x4 --models pflow_r1,fla_deltanet \
        --out runs/fusions_new.json > runs/fusions_new.log 2>&1
    box 80 python3 $B/bench_model.py --sizes 1.3b --shapes 2048x16,8192x4 --models pflow_r1 \
        --ablate shared_input_linear,fused_add_norm --out runs/fusions_old.json > runs/fusions_old.log 2>&1
    tail -n 3 runs/gpu_glue_tests.log
    grep -h '^1.3b/' runs/fusions_*.log
    tar czf "$OUT/fusions.tgz" runs/gpu_glue_tests.log runs/fusions_*
    ;;
convtune)
    # the conv backward's launch settings (bench_conv.py), then the 1.3B training step with the defaults (fla in
    # the same process; its first run on a machine autotunes for minutes) and with the fastest settings (their
    # PFLOW_CONV_* environment, own process)
    box 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_liger_layers.py tests/test_triton_glue.py \
        > runs/gpu_glue_tests.log 2>&1
    box 120 python3 $B/bench_conv.py --env --out runs/conv_sweep.json > runs/conv_sweep.log 2>&1
    best=$(grep '^PFLOW_CONV_' runs/conv_sweep.log | tail -n 1)
    box 300 python3 $B/bench_model.py --sizes 1.3b --shapes 2048x16,8192x4 --models pflow_r1,fla_deltanet \
        --out runs/model13b_defaults.json > runs/model13b_defaults.log 2>&1
    [[ -n $best ]] && env $best timeout --signal=INT 90 python3 $B/bench_model.py --sizes 1.3b \
        --shapes 2048x16,8192x4 --models pflow_r1 --out runs/model13b_best_conv.json > runs/model13b_best_conv.log 2>&1
    tail -n 3 runs/gpu_glue_tests.log
    tail -n 12 runs/conv_sweep.log
    grep -h '^1.3b/' runs/model13b_*.log
    tar czf "$OUT/convtune.tgz" runs/gpu_glue_tests.log runs/conv_sweep.* runs/model13b_*
    ;;
opcheck)
    # after a kernel change: the sweep subset (float64 loop, gradients, head widths 16-256, R 1 / 3 / 8; or
    # SWEEP_FILTER) with SWEEP_TUNE (TUNE overrides, key=int), then the op at the long and the short shape,
    # VARIANTS of profile_kernels.py (per-kernel times for KERNELS_FOR), PROVIDERS (fla beside by default).
    # R = 5 / 8 chunking (branch r8-chunk8; wrong at K = 32: benchmarks/results/r8_chunk8_h200/):
    # SWEEP_FILTER='^(tensor_inv|sigdelta)-.*-R(5|8)-'
    # PROVIDERS=ours_R8_sum,ours_R4_sum
    box 200 python3 $B/gpu_sweep.py --filter "${SWEEP_FILTER:-^(tensor_inv|sigdelta)-.*-R(1|3|8)-K(16|48|128|256)-}" \
        --workers 4 --tune ${SWEEP_TUNE:-} --out runs/sweep_subset.json > runs/sweep_subset.log 2>&1
    for shape in 2048x16 16384x2; do
        box 130 python3 $B/profile_kernels.py --shape $shape --variants "${VARIANTS:-base}" \
            --kernels-for "${KERNELS_FOR:-base}" --providers "${PROVIDERS:-ours_R1_sum,ours_R4_sum,fla_delta_rule_R1}" \
            --out runs/profile_$shape.json > runs/profile_$shape.log 2>&1
    done
    tail -n 2 runs/sweep_subset.log
    grep -h '"fwdbwd"' runs/profile_*.log | cut -c 1-90
    tar czf "$OUT/opcheck.tgz" runs/sweep_subset.* runs/profile_*
    ;;
scancfg)
    # the sequential kernels' launch settings at the long shape (32 (sequence, head) pairs), where their
    # per-chunk latency bounds the op (a3b8d7f: 2.5 us a chunk against fla's 1.0). One process per variant: an
    # illegal access leaves the CUDA context broken (at 0457324 one-stage bf16 scans hit one at K = 128, and
    # that variant is gone).
    for variant in base scan_stages2 stages4 min256 min64; do
        box 60 python3 $B/profile_kernels.py --shape 16384x2 --kernels-for base --variants $variant \
            --providers ours_R1_sum,ours_R4_sum --out runs/profile_scancfg_$variant.json \
            > runs/profile_scancfg_$variant.log 2>&1
    done
    grep -h '"fwdbwd"' runs/profile_scancfg_*.log | cut -c 1-90
    tar czf "$OUT/scancfg.tgz" runs/profile_scancfg_*
    ;;
ncu)
    # Nsight Compute's counters (throughput against peak, L2 and DRAM traffic, occupancy, warp stalls) for every
    # kernel of one fwd+bwd at SHAPE (default 16384 x 2), ours R = 1 and fla. Needs a Firecracker machine: on
    # gVisor ncu cannot read the counters (/work/.library/device/H200.md), and the log says so.
    shape=${SHAPE:-16384x2}
    ncu --version > runs/ncu.log 2>&1
    box ${NCU_WALL:-420} ncu --clock-control none --profile-from-start off --force-overwrite --export runs/ncu_$shape \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section WarpStateStats --section SchedulerStats \
        python3 $B/ncu_kernels.py --shape $shape --providers ours_R1_sum,fla_delta_rule_R1 >> runs/ncu.log 2>&1
    ncu --import runs/ncu_$shape.ncu-rep --csv --page details > runs/ncu_$shape.csv 2>> runs/ncu.log
    tail -n 5 runs/ncu.log
    tar czf "$OUT/ncu.tgz" runs/ncu*
    ;;
offsets)
    box 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_glue.py > runs/gpu_glue_tests.log 2>&1
    box 170 python3 $B/bench_generate.py --providers 'pflow-r4 static+graphs,pflow-r1 static+graphs' --batches 64 \
        --prompts 32768 --out runs/generate_b64_32k.json > runs/generate_b64_32k.log 2>&1
    box 110 python3 $B/bench_generate.py --providers fla-deltanet --batches 1,8,64 --prompts 512 \
        --out runs/generate_fla.json > runs/generate_fla.log 2>&1
    tail -n 4 runs/gpu_glue_tests.log runs/generate_b64_32k.log runs/generate_fla.log
    tar czf "$OUT/offsets.tgz" runs/gpu_glue_tests.log runs/generate_b64_32k.* runs/generate_fla.*
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
