# The worker image: CUDA 12 runtime with cuDNN (what the CTranslate2 wheel needs on GPU), Python,
# CTranslate2 and transformers' tokenizers. Two targets:
#   worker  (what compose runs): serving, and building the random-weight demo model; no PyTorch.
#   convert (docker build --target convert): the worker plus PyTorch's CPU build, for
#           `batchgen convert` of a real Hugging Face checkpoint (docs/operations.md, "Running it with Docker").
# CUDA_IMAGE: the base (the compose test builds on a local stand-in; see tests/compose).
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
WORKDIR /app
# Dependencies first, in a layer that only pyproject.toml and constraints.txt change: a code or
# README change rebuilds in seconds.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['worker'] + p['optional-dependencies']['ops']))" \
      > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt
COPY README.md alembic.ini ./
COPY core core
COPY webapi webapi
COPY worker worker
COPY cli cli
COPY migrations migrations
RUN pip install --no-deps -e . \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin batchgen \
 && mkdir -p /var/lib/batchgen /models && chown batchgen /var/lib/batchgen /models

USER batchgen
CMD ["python", "-m", "worker", "--device", "cuda"]

FROM worker AS convert
USER root
# torch from PyTorch's CPU index, pinned: an unpinned torch would pull several GB of CUDA wheels.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}" \
 && pip install -c constraints.txt -e ".[worker,convert,ops]"
USER batchgen
CMD ["batchgen", "convert", "--help"]
