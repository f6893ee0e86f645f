#!/usr/bin/env bash
# The GPU check (docs/gpu.md), sized for <= 8 minutes on one H200 whose image has torch with CUDA.
#
# 1. the `cuda`-marked tests (tests/ml/test_cuda.py);
# 2. a short bench (`python -m server bench --device cuda`): GPT-2-124M architecture with random weights in bfloat16;
#    transformers `generate` vs our loop offline at batch 1 and 32, the server at c=1 and c=32, for 16 and 128 new
#    tokens, plus time to first token. JSON, logs and the test report go to ${OUT:-bench-results}.
#
# Wheels: the device image (Python 3.12) already holds torch, numpy, aiohttp, httpx, jinja2, prometheus-client,
# tqdm, pyyaml, uvloop, pytest, pytest-timeout and hypothesis. The rest travel in .whl/ (git-ignored), the versions
# this project is tested with:
WHEELS=(
  transformers==5.25.0 tokenizers==0.23.3 huggingface_hub==2.4.0 typing_extensions==4.16.0
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 httptools==0.9.0 watchfiles==1.3.0 websockets==16.1.1
  python-dotenv==1.2.2 pydantic==2.13.4 pydantic_core==2.46.4 pydantic-settings==2.14.1 annotated-types==0.7.0
  typing-inspection==0.4.2 SQLAlchemy==2.1.9 greenlet==3.5.6 aiosqlite==0.22.1 asyncpg==0.32.0 alembic==1.20.1
  Mako==1.4.3 redis==8.2.0 hiredis==3.5.0 croniter==7.0.0 openai==2.54.0 anthropic==0.125.0 distro==1.9.0
  jiter==0.19.0 sniffio==1.3.1 docstring_parser==0.18.0 google-genai==1.75.0 google-auth==2.63.0 pyasn1==0.6.3
  pyasn1_modules==0.4.2 rsa==4.7.2 tenacity==9.1.4 pytest-asyncio==1.5.0 opentelemetry-api==1.45.2
  cryptography==48.0.0 cffi==2.0.0 pycparser==3.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
  kernels==0.19.1 tomlkit==0.15.3 click==8.5.1
)
# Fetch them once, on a machine with pip access, from the repository root:
#   echo /.whl/ >> .git/info/exclude && scripts/gpu-check.sh --fetch-wheels
# Then run on the device machine (device tool `run`, carry [".whl"], timeout_s 540):
#   bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi

OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$SECONDS

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  --find-links .whl "${WHEELS[@]}" || { echo "wheel install failed: fetch them with --fetch-wheels"; exit 3; }
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'gpu', torch.cuda.is_available(), 'bf16', torch.cuda.is_bf16_supported(), 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

echo "== cuda tests ($((SECONDS - started)) s)"
timeout 180 python3 -m pytest -q -m cuda tests/ml/test_cuda.py -p no:cacheprovider -o addopts="" \
  --junitxml="$OUT/cuda-tests.xml" 2>&1 | tee "$OUT/cuda-tests.log"
tests=$?

echo "== bench ($((SECONDS - started)) s)"
timeout 300 python3 -m server bench --device cuda --dtype bfloat16 --gpu-batch 32 --gpu-concurrency 1,32 \
  --gpu-new-tokens 16,128 --gpu-repeats 3 --rounds 4 --stream-rounds 6 --output "$OUT/gpu-bench.json" 2>&1 \
  | tee "$OUT/bench.log"
bench=$?

echo "== done in $((SECONDS - started)) s: tests exit $tests, bench exit $bench"
exit $(( tests != 0 || bench != 0 ))
