# The API image: Flask + gunicorn + the shared core. No model libraries (no CTranslate2, no
# transformers, no torch): prompt tokens are counted with the tokenizers library alone.
# PYTHON_IMAGE: the base (the compose test builds on a local stand-in; see tests/compose).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# Dependencies first, in a layer that only pyproject.toml and constraints.txt change: a code or
# README change rebuilds in seconds.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt
COPY README.md alembic.ini ./
COPY core core
COPY webapi webapi
COPY cli cli
COPY migrations migrations
# worker/ is only there for imports of `batchgen` subcommands that the API image never runs.
COPY worker worker
RUN pip install --no-deps -e . \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin batchgen \
 && mkdir -p /var/lib/batchgen && chown batchgen /var/lib/batchgen
USER batchgen
EXPOSE 8000
CMD ["batchgen", "api", "--bind", "0.0.0.0:8000"]
