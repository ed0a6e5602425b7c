# syntax=docker/dockerfile:1
# The SSP-SAM Label Studio ML backend: `ssp-sam serve` (gunicorn) by default; the same image runs the trainer
# (`ssp-sam finetune --watch`) and the datastore migrations (`ssp-sam datastore upgrade`). docs/deploy.md has the
# commands; tests/test_deploy.py checks that this file, docker-compose.yml and that page agree.
#
#   docker build -t ssp-sam-labelstudio:cpu .                                    # CPU (the default TARGET)
#   docker build --build-arg TARGET=cuda -t ssp-sam-labelstudio:cuda .           # NVIDIA GPU
#   docker build --build-arg BAKE_VARIANT=ssp-sam-336 --build-arg BAKE_DATASET=refcoco -t ssp-sam-labelstudio:cpu-336 .
#
# Build arguments:
#   TARGET               cpu | cuda: which torch build goes in (stage torch-cpu or torch-cuda below)
#   PYTHON_VERSION       the python:<version>-slim base (3.11)
#   TORCH_CPU_INDEX_URL  where TARGET=cpu gets its CPU-only torch/torchvision wheels (the PyTorch CPU index)
#   BAKE_VARIANT         empty: no official weights in the image (the packaged demo model serves); ssp-sam-224 or
#                        ssp-sam-336: `ssp-sam download-weights` puts them into /opt/ssp-sam/weights at build time
#   BAKE_DATASET         the dataset of the baked SSP-SAM checkpoint (refcoco by default)
#   HF_ENDPOINT          the Hugging Face endpoint the bake downloads from (a mirror; huggingface_hub reads it)
# A Hugging Face token for the bake is a build secret, never a build argument (arguments stay in the image's
# history): docker build --secret id=hf_token,env=HF_TOKEN ...

ARG TARGET=cpu
ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# curl: the HEALTHCHECK; libglib2.0-0: needed by opencv-python-headless (a label-studio-sdk dependency)
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt ./

# ---------------------------------------------------------------------------------------------------------------------
# torch and torchvision at exactly the versions requirements.txt pins (read from it, never repeated here).
#
# CPU: the PyTorch CPU index. PyPI's Linux torch wheel is a CUDA build that pulls several GB of nvidia-* wheels a
# CPU host never uses; the CPU index has the same release as a CPU-only build, versioned 2.14.1+cpu, which satisfies
# the pin torch==2.14.1 (a local version label is ignored by ==), so the `pip install -r requirements.txt` below keeps
# it. Only these two packages come from that index: every other package comes from PyPI.
FROM base AS torch-cpu
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_CPU_INDEX_URL" $(grep -E '^torch(vision)?==' requirements.txt | cut -d' ' -f1)

# CUDA: the default PyPI wheel of the same pins. It is built against CUDA and brings the CUDA runtime, cuDNN and NCCL
# as nvidia-* wheels, so the base stays python:slim: an nvidia/cuda base image would add a second copy of those
# libraries whose CUDA version would have to match torch's. Only the host's NVIDIA driver is needed, mounted by the
# NVIDIA Container Toolkit (docker run --gpus all, or the device reservation of docker-compose.gpu.yml); the driver
# must support the CUDA version of that wheel (nvidia-smi shows the highest one it supports).
FROM base AS torch-cuda
RUN pip install $(grep -E '^torch(vision)?==' requirements.txt | cut -d' ' -f1)
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------------------------------------------------------------
FROM torch-${TARGET} AS runtime
ARG TARGET

# The rest of the pins; torch/torchvision are already satisfied. The check fails the build when the torch that ended
# up installed is not the build TARGET asked for (a CUDA wheel in the CPU image or the reverse).
RUN pip install -r requirements.txt \
 && pip check \
 && python -c "import sys, torch; cuda = torch.version.cuda is not None; \
sys.exit(0 if cuda == ('$TARGET' == 'cuda') else 'torch ' + torch.__version__ + ' does not match TARGET=$TARGET')"

COPY pyproject.toml README.md ./
COPY ssp_sam ./ssp_sam
COPY backend ./backend
RUN pip install --no-deps -e .

# A non-root user; /data (MODEL_DIR, the Hugging Face cache) and /weights (downloaded weights) are its volumes.
RUN useradd --create-home --uid 1000 --user-group app \
 && mkdir -p /data/model_dir /data/cache /weights \
 && chown -R app:app /data /weights

ENV HOST=0.0.0.0 \
    PORT=9090 \
    WORKERS=1 \
    THREADS=8 \
    LOG_LEVEL=INFO \
    MODEL_DIR=/data/model_dir \
    HF_HOME=/data/cache/huggingface

# Optional: official weights baked into the image (outside the volumes, so a mounted /weights or /data cannot hide
# them). The download's caches live in a BuildKit cache mount, not in a layer; a link from the weights into that
# cache would dangle in the image, so the build fails if there is one.
ARG BAKE_VARIANT=
ARG BAKE_DATASET=refcoco
ARG HF_ENDPOINT=https://huggingface.co
RUN --mount=type=cache,target=/var/cache/ssp-sam-build \
    --mount=type=secret,id=hf_token,required=false \
    if [ -n "$BAKE_VARIANT" ]; then \
      HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
      HF_HOME=/var/cache/ssp-sam-build/huggingface XDG_CACHE_HOME=/var/cache/ssp-sam-build \
      ssp-sam download-weights --variant "$BAKE_VARIANT" --dataset "$BAKE_DATASET" --out /opt/ssp-sam/weights \
      && if find /opt/ssp-sam/weights -xtype l | grep -q .; then \
           echo "baked weights link into the build cache" >&2; exit 1; fi \
      && chmod -R a+rX /opt/ssp-sam/weights; \
    fi
# Serve what was baked unless the environment says otherwise (empty values count as unset).
ENV SSP_SAM_VARIANT=${BAKE_VARIANT:-demo} \
    SSP_SAM_WEIGHTS_DIR=${BAKE_VARIANT:+/opt/ssp-sam/weights}

USER app
VOLUME ["/data", "/weights"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1

# No --preload: the model loads in each worker (never in the master; CUDA cannot be re-initialised after fork).
CMD ["ssp-sam", "serve"]
