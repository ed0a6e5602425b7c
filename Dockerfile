# SSP-SAM Label Studio ML backend (gunicorn). CPU by default; the pinned torch wheel also runs on CUDA hosts
# (docker run --gpus all ... -e DEVICE=cuda).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=9090 \
    WORKERS=1 \
    THREADS=8 \
    LOG_LEVEL=INFO \
    MODEL_DIR=/data/model_dir \
    SSP_SAM_VARIANT=demo \
    HF_HOME=/data/cache/huggingface

RUN apt-get update \
 && apt-get install -y --no-install-recommends curl libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY pyproject.toml README.md ./
COPY ssp_sam ./ssp_sam
COPY backend ./backend
RUN pip install --no-deps -e .

RUN useradd --create-home --uid 1000 app \
 && mkdir -p /data/model_dir /data/cache \
 && chown -R app:app /data
USER app
VOLUME ["/data"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1

# No --preload: the model loads in each worker (never in the master; CUDA cannot be re-initialised after fork).
CMD ["ssp-sam", "serve"]
