FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HOST=0.0.0.0 PORT=8000 MODEL_SOURCE=local
WORKDIR /app
RUN useradd --create-home --uid 1000 app
# g++ builds the one-row kernel for the CPU the container runs on, at its first model load (server/ml/matvec.py),
# into TORCH_EXTENSIONS_DIR; without it the kernels are chosen without that one.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
ENV TORCH_EXTENSIONS_DIR=/app/models_cache/torch_extensions

# The CPU build of torch first: a bare torch requirement would pull a multi-GB CUDA build. For a GPU image pass the
# CUDA build's index: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (docs/gpu.md).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements.txt .
RUN pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL" && pip install -r requirements.txt

COPY . .
# Weights are fetched at build time into models_cache/, so the container never needs the hub.
RUN python -m server models fetch && mkdir -p data && chown -R app:app /app
USER app
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
CMD ["python", "-m", "server", "serve"]
