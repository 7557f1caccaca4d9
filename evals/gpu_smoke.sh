#!/usr/bin/env bash
# Evaluate a tiny PFlow checkpoint on CUDA: the runner on the whole bundled suite (fp32, batch 8, Triton
# kernels), the same at batch 1 compared with it, and the plain harness CLI in bf16 on the checkpoint's remote
# code. lm-eval and the deps the GPU image lacks are installed from .whl/ (see evals/README.md).
#
# Usage, from the repository root:  OUT=/some/dir bash evals/gpu_smoke.sh
# (DEVICE=cuda and LIMIT=<docs per task> for the runner runs may be set; default: every doc.)
# Writes $OUT/fp32_bs8/results.{json,md,png}, $OUT/cli_bf16/<model>/results_*.json, $OUT/smoke.log.
set -euo pipefail

OUT=${OUT:-runs/gpu_smoke}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:+--limit $LIMIT}
SITE=${PFLOW_EVAL_SITE:-/tmp/pflow_eval_site}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
exec > >(tee "$OUT/smoke.log") 2>&1

# lm-eval's needs that the GPU image (torch, transformers, accelerate, pandas, pyarrow, sacrebleu, sklearn,
# jinja2, pyyaml, huggingface_hub ...) does not have; pytablewriter & co. only print the CLI's table.
WHEELS=(lm_eval datasets dill multiprocess pytablewriter dataproperty mbstrdecoder pathvalidate tabledata
        tcolorpy typepy chardet pytz)
files=()
for name in "${WHEELS[@]}"; do
    found=(.whl/"$name"-*.whl)
    [[ -e ${found[0]} ]] || { echo "missing wheel .whl/$name-*.whl (see evals/README.md)"; exit 1; }
    files+=("${found[0]}")
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${files[@]}"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

python3 - <<'EOF'
import importlib.metadata as md, subprocess, torch
names = ["torch", "transformers", "triton", "lm_eval", "datasets", "pyarrow", "fsspec", "pandas", "huggingface_hub"]
print("versions:", {n: md.version(n) for n in names})
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:  # no git on the machine
    commit = ""
print("commit:", commit or "unknown (no .git in the copied tree)")
EOF

CKPT="$WORK/pflow_tiny"
python3 -m evals.tiny "$CKPT"
EVAL=(python3 -m modeling_parallelflow eval "$CKPT" --device "$DEVICE" --max-length 16384 --log-samples $LIMIT)

echo "== runner, fp32, batch 8"
"${EVAL[@]}" --batch-size 8 --dtype float32 --output-dir "$OUT/fp32_bs8"
echo "== runner, fp32, batch 1 (compared with batch 8 below)"
"${EVAL[@]}" --batch-size 1 --dtype float32 --output-dir "$WORK/fp32_bs1"

python3 - "$OUT/fp32_bs8" "$WORK/fp32_bs1" <<'EOF'
import json, sys
def samples(folder):
    out = {}
    for line in open(f"{folder}/samples.jsonl"):
        s = json.loads(line)
        resps = [r[0] for r in s["resps"]]
        out[(s["task"], s["doc_id"])] = resps
    return out
a, b = samples(sys.argv[1]), samples(sys.argv[2])
assert a.keys() == b.keys(), "different samples"
worst, gen_diff = 0.0, 0
for key in a:
    for x, y in zip(a[key], b[key]):
        if isinstance(x, str):
            gen_diff += x != y
        else:
            x, y = (v[0] if isinstance(v, list) else v for v in (x, y))
            worst = max(worst, abs(x - y))
print(f"batch 8 vs 1: {len(a)} docs, max |loglikelihood diff| = {worst:.3g}, generations differing: {gen_diff}")
EOF

echo "== plain harness CLI, bf16, batch 8, remote code"
python3 -m lm_eval --model hf \
    --model_args "pretrained=$CKPT,trust_remote_code=True,dtype=bfloat16,max_length=16384" \
    --tasks parallelflow_offline --include_path "$PWD/evals/tasks" \
    --device "$DEVICE" --batch_size 8 --limit 10 --output_path "$OUT/cli_bf16"
rm "$OUT"/fp32_bs8/samples.jsonl  # only needed for the comparison; keeps what comes back small
echo "gpu smoke: OK"
