# The README's contract: `make run` serves batchgen on this machine, `make test` tests it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two installs: what serving needs (make run: the API, a CPU worker, embedded Redis; no PyTorch,
# no test tools), and on top of it what the tests and the bench need.
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
# EleutherAI's lm-eval, a client the tests run as a user would, in its own environment (it pulls
# datasets, scikit-learn and more that batchgen does not need; no PyTorch).
LMEVAL     := .venv-lmeval/bin/lm_eval

.PHONY: install install-dev run test test-fast test-compose bench docs clean

$(RUN_STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[worker]'
	@touch $@

$(TEST_STAMP): $(RUN_STAMP)
	# torch first, pinned: resolving it unpinned would fetch a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[worker,convert,ops,test]'
	@touch $@

install: $(RUN_STAMP)

install-dev: $(TEST_STAMP)

$(LMEVAL):
	@test -x .venv-lmeval/bin/python || $(PYTHON) -m venv .venv-lmeval
	@# Without a package index the lm-eval test says it is skipped, and why; the rest still runs.
	.venv-lmeval/bin/python -m pip install --quiet "lm-eval[api]==0.4.13" \
	  || echo "lm-eval could not be installed: tests/test_lm_eval.py will be skipped"

run: install
	$(BIN)/batchgen up

test: install-dev $(LMEVAL)
	@# The compose file is checked with docker-compose (no Docker engine needed); install it if we can.
	@command -v docker-compose >/dev/null 2>&1 || (apt-get install -y -q docker-compose >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker-compose >/dev/null 2>&1)) || true
	@# The web page is tested in Debian's chromium (driven by Playwright); install it if we can.
	@test -x /usr/bin/chromium || (apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || true
	@# The partition tests drop packets with iptables in the machine's own network namespace.
	@command -v iptables >/dev/null 2>&1 || (apt-get install -y -q iptables >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q iptables >/dev/null 2>&1)) || true
	$(BIN)/python -m ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest
	@# The compose stack for real, where a Docker engine can run (one line says so where it cannot).
	@PYTHON=$(BIN)/python bash tests/compose/run.sh --if-possible

# The fast lane while you work: lint, and every test that starts no worker process, no browser and
# measures no model. make test (what CI runs) runs everything.
test-fast: install-dev
	$(BIN)/python -m ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not slow" -q

# Builds the images and runs the compose stack (--profile cpu) with faults; see tests/compose/run.sh.
test-compose: install-dev
	PYTHON=$(BIN)/python bash tests/compose/run.sh

bench: install-dev
	$(BIN)/python -m bench.throughput

# docs/configuration.md is generated from the settings model (a test checks it is current).
docs: install
	$(BIN)/python -m cli.config_docs > docs/configuration.md

clean:
	rm -rf $(VENV) .venv-lmeval var .pytest_cache
