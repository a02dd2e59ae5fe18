#!/usr/bin/env bash
# The GPU check, on one NVIDIA GPU (H100 / H200 class), in under 7 minutes, results in ONE folder:
#   1. the gpu test tier (bf16/fp16 kernels vs an fp32 oracle, patched vs unpatched models) and
#      the kernel tests on the GPU in fp32;
#   2. the kernel micro-benchmark (ours vs torch reference vs Liger): scripts/bench_kernels.py;
#   3. the training benchmark, LoRA SFT: ours with kernels, ours without, TRL + PEFT, TRL + PEFT
#      + Liger, on random:135m (SmolLM2-135M's shape and vocabulary) and random:1b.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default runs/gpu_check (or $OUT when set)
#
# OUT_DIR gets five files: report.md (versions, timings, every table, the tail of any failing
# phase), tests.xml, kernels.json, train-135m.json, train-1b.json. Models, run dirs and full
# logs stay in runs/gpu_check_work/.
#
# A GPU machine with its own torch / triton / transformers / peft / accelerate and no network:
# prepare .gpu/ beforehand where pip works (bash scripts/prepare_gpu_bundle.sh), carry it along;
# the wheels are installed into /tmp/site (nothing outside it changes) and SmolLM2's tokenizer
# is taken from .gpu/cache. Each phase has its own time limit; a failing phase is recorded and
# the next one still runs. Exit code: 0 when every phase passed.
#
# GPU_CHECK_QUICK=1 runs the same plumbing in a minute or two on any machine (CPU included):
# one test, the --quick kernel shapes, random:tiny, torch-cpu when there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=${GPU_CHECK_QUICK:-0}
START=$(date +%s)
RESULTS=${1:-${OUT:-runs/gpu_check}}
WORK=runs/gpu_check_work
mkdir -p "$RESULTS" "$WORK"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
unset TRITON_INTERPRET
FAILED=()

REPORT=$RESULTS/report.md
phase() {  # phase NAME SECONDS COMMAND...: run with a time limit, log to WORK/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "gpu_check: $name (limit ${limit}s, at $(( t0 - START ))s)"
  timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 5 "$WORK/$name.log"
  echo "- $name: exit $rc in $(( $(date +%s) - t0 ))s" >> "$WORK/summary.md"
  if [ $rc -ne 0 ]; then
    FAILED+=("$name")
    { echo; echo "### $name failed (exit $rc): last lines"; echo '```';
      tail -n 40 "$WORK/$name.log"; echo '```'; } >> "$WORK/failures.md"
  fi
}

: > "$WORK/summary.md"; : > "$WORK/failures.md"
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -f .gpu/cache/models/smollm2-135m-instruct/tokenizer.json ] && export POSTTRAIN_CACHE=$PWD/.gpu/cache
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  > "$WORK/versions.txt" 2>&1
$PY - >> "$WORK/versions.txt" 2>&1 <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "peft", "accelerate", "trl", "datasets",
             "liger_kernel", "gguf", "jsonschema"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as e:  # report, do not stop
        print(name, "NOT IMPORTABLE:", type(e).__name__, str(e).splitlines()[0][:200])
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF
cat "$WORK/versions.txt"

GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$GPU" != 1 ] && [ "$QUICK" != 1 ]; then
  echo "gpu_check: no CUDA GPU visible to torch here (GPU_CHECK_QUICK=1 tries the plumbing)" >&2
  exit 2
fi
BACKEND=torch-cuda; DTYPE=bfloat16; TESTS=(tests/test_kernels.py tests/test_kernel_models.py
  "tests/test_torch_backend.py::test_bfloat16_on_gpu_trains_and_isolates_documents")
SMALL=(--model random:135m --batch-size 16 --max-length 1024 --steps 10 --warmup 2 --timeout 30)
LARGE=(--model random:1b --batch-size 8 --max-length 1024 --steps 6 --warmup 2 --timeout 40)
KQUICK=(); VARIANTS=(--kernel-variants)
if [ "$QUICK" = 1 ]; then
  [ "$GPU" = 1 ] || { BACKEND=torch-cpu; DTYPE=float32; VARIANTS=(); }
  TESTS=(tests/test_kernels.py -k lora_qkv); KQUICK=(--quick)
  SMALL=(--model random:tiny --batch-size 2 --max-length 128 --steps 3 --warmup 1 --timeout 120)
  LARGE=("${SMALL[@]}")
fi

# 1. tests: every kernel test on the GPU (fp32 and the gpu tier) + the backend's gpu tests
phase tests 100 $PY -m pytest -q -p no:cacheprovider -m "not slow" -x "${TESTS[@]}" \
  --junitxml="$RESULTS/tests.xml"

# 2. kernel micro-benchmark
phase kernels 75 $PY scripts/bench_kernels.py --reps 5 "${KQUICK[@]}" --out "$WORK/kernels"

# 3. training benchmark (same recipe for every runner; TRL reads the same synthetic data)
BENCH=(--algorithm sft --data synthetic:chat --fine-tune-type lora --lora-rank 16
       --lora-alpha 32 --dtype "$DTYPE" --model-dtype "$DTYPE" --backends "$BACKEND"
       "${VARIANTS[@]}" --compare trl trl-liger --no-charts --extra=--logprob-chunk-size=2048)
phase train-135m 100 $PY scripts/bench.py "${BENCH[@]}" "${SMALL[@]}" --out "$WORK/train-135m"
phase train-1b 120 $PY scripts/bench.py "${BENCH[@]}" "${LARGE[@]}" --out "$WORK/train-1b"

# one folder: report.md + the machine-readable results
cp "$WORK/kernels/results.json" "$RESULTS/kernels.json" 2>/dev/null
cp "$WORK/train-135m/results.json" "$RESULTS/train-135m.json" 2>/dev/null
cp "$WORK/train-1b/results.json" "$RESULTS/train-1b.json" 2>/dev/null
{
  echo "# gpu_check $(date -u +%FT%TZ), $(( $(date +%s) - START ))s, commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo; echo '```'; cat "$WORK/versions.txt"; echo '```'
  echo; echo "## Phases"; cat "$WORK/summary.md"
  echo; echo "## Tests"; echo '```'; tail -n 3 "$WORK/tests.log"; echo '```'
  for part in kernels train-135m train-1b; do
    echo; echo "## $part"
    cat "$WORK/$part/results.md" 2>/dev/null || echo "(no results)"
  done
  cat "$WORK/failures.md"
} > "$REPORT"
echo "gpu_check: $(( $(date +%s) - START ))s; $REPORT; failed phases: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
