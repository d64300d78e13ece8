# The worker image: CUDA 12 runtime with cuDNN (what the CTranslate2 wheel needs on GPU), Python,
# CTranslate2, transformers, and PyTorch's CPU build for converting checkpoints (not for serving).
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH TOKENIZERS_PARALLELISM=false
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY core core
COPY webapi webapi
COPY worker worker
COPY cli cli
COPY migrations migrations
# torch from PyTorch's CPU index, pinned: an unpinned torch would pull several GB of CUDA wheels.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
 && pip install -c constraints.txt -e ".[worker,convert,ops]" \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin batchgen \
 && mkdir -p /var/lib/batchgen /models && chown batchgen /var/lib/batchgen /models
USER batchgen
CMD ["python", "-m", "worker", "--device", "cuda"]
