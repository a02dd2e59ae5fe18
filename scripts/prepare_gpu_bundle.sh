#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored), everything scripts/gpu_check.sh needs that a GPU machine with no
# network may lack: wheels for Python 3.12 / x86_64 (TRL and its datasets stack, Liger-Kernel,
# gguf, jsonschema) and SmolLM2's tokenizer files (random:135m / random:1b models are built on
# the GPU machine with SmolLM2's 49,152-token vocabulary). About 4 MB.
#   bash scripts/prepare_gpu_bundle.sh          # here, with network
#   carry .gpu to the GPU machine, then: bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/cache/models/smollm2-135m-instruct
# One version of each; --no-deps: the GPU image already has torch, triton, transformers, peft,
# accelerate, pandas, pyarrow, xxhash, fsspec, huggingface-hub, attrs, requests, tqdm, pyyaml.
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .gpu/wheels trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  liger-kernel==0.8.5 gguf==0.19.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1
TOKENIZER=$($PY -m converters import-default)  # SmolLM2-135M-Instruct in the posttrain cache
for f in tokenizer.json tokenizer_config.json special_tokens_map.json generation_config.json \
         chat_template.jinja; do
  [ -f "$TOKENIZER/$f" ] && cp "$TOKENIZER/$f" .gpu/cache/models/smollm2-135m-instruct/
done
du -sh .gpu && ls .gpu/wheels
