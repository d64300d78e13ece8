# Stand-in for nvidia/cuda:*-runtime-ubuntu24.04 on a machine without a GPU: a Debian system
# whose apt-get installs what the worker image asks for. No CUDA libraries: the CPU worker runs.
ARG BASE
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
 && rm -rf /var/lib/apt/lists/*
