#!/usr/bin/env bash
# make test-compose: the compose stack built and run for real (tests/compose/test_stack.py).
#   1. what it needs: docker.io (dockerd), debootstrap, docker-compose (Debian's, 1.29);
#   2. a Docker engine: the one running, or one started here without touching host networking
#      (no iptables rules, no masquerading, no default bridge), stopped again at the end;
#   3. stand-ins for the base images no registry can give us here (tests/compose/standins, built
#      once per machine), then the project's images from docker/*.Dockerfile on them, tagged
#      batchgen-test/* so a user's own batchgen-api/batchgen-worker images are never replaced;
#   4. the live test, which brings the stack up with --profile cpu and takes it down again.
# With --if-possible (what `make test` passes), a machine that cannot run a Docker engine and its
# containers is told so in one line and the run succeeds; without it, that is a failure. Failures
# of the project's own images or of the test always fail.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}
if_possible=0; [ "${1:-}" = "--if-possible" ] && if_possible=1
project=batchgen-compose-test
started_at=$(date +%s)
state=var/compose; mkdir -p "$state"

cannot() {
  if [ $if_possible = 1 ]; then echo "test-compose: skipped, no Docker engine can run the stack here: $*"; exit 0; fi
  echo "test-compose: $*" >&2; exit 1
}

dockerd_pid=
stop_dockerd() {
  [ -n "$dockerd_pid" ] || return 0
  # Whatever an interrupted test left must not outlive the engine (the worker's stop grace is 2 min).
  docker ps -aq --filter "label=com.docker.compose.project=$project" | xargs -r docker rm -f >/dev/null 2>&1 || true
  kill "$dockerd_pid" 2>/dev/null || true
  for _ in $(seq 120); do kill -0 "$dockerd_pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$dockerd_pid" 2>/dev/null || true
}
trap stop_dockerd EXIT

if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || cannot "no running Docker engine, and starting one needs root"
  missing=()
  for cmd in dockerd:docker.io debootstrap:debootstrap docker-compose:docker-compose; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || missing+=("${cmd#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -q "${missing[@]}" >"$state/apt.log" 2>&1 \
      || { apt-get update -q >>"$state/apt.log" 2>&1 && apt-get install -y -q "${missing[@]}" >>"$state/apt.log" 2>&1; } \
      || cannot "apt-get could not install ${missing[*]} (see $state/apt.log)"
  fi
fi
if ! docker info >/dev/null 2>&1; then  # (installing docker.io may have started the system's own)
  dockerd --iptables=false --ip-masq=false --bridge=none --shutdown-timeout 10 \
    --pidfile "$PWD/$state/dockerd.pid" >"$state/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || cannot "dockerd did not start: $(tail -1 "$state/dockerd.log")"
fi
for cmd in debootstrap docker-compose; do
  command -v $cmd >/dev/null 2>&1 || apt-get install -y -q $cmd >>"$state/apt.log" 2>&1 || cannot "$cmd is missing"
done
if [ "$(id -u)" != 0 ] && ! docker image inspect batchgen-standin/debian:bookworm >/dev/null 2>&1; then
  cannot "the stand-in base images are not built, and debootstrap needs root"
fi

tests/compose/standins/build.sh >"$state/standins.log" 2>&1 || { tail -20 "$state/standins.log";
  cannot "the stand-in base images could not be built (see $state/standins.log)"; }
grep '^stand-ins:' "$state/standins.log" || true
docker run --rm --network none batchgen-standin/debian:bookworm true >/dev/null 2>&1 \
  || cannot "the engine cannot run a container"

t0=$(date +%s)
build() {  # tag dockerfile build-arg [target]
  local log="$state/build-${1//\//-}.log" old
  old=$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)
  docker build --force-rm --network host --build-arg "$3" ${4:+--target "$4"} -f "$2" -t "$1" . >"$log" 2>&1 \
    || { tail -40 "$log"; echo "test-compose: building $1 failed (whole log: $log)" >&2; exit 1; }
  local new; new=$(docker image inspect -f '{{.Id}}' "$1")
  [ -z "$old" ] || [ "$old" = "$new" ] || docker rmi "$old" >/dev/null 2>&1 || true
}
build batchgen-test/api docker/api.Dockerfile PYTHON_IMAGE=batchgen-standin/python:3.11-slim
build batchgen-test/worker docker/worker.Dockerfile CUDA_IMAGE=batchgen-standin/cuda:12-runtime worker
echo "test-compose: images built in $(( $(date +%s) - t0 )) s"

BATCHGEN_COMPOSE_LIVE=1 BATCHGEN_COMPOSE_PROJECT=$project \
  "$python" -m pytest tests/compose/test_stack.py -p no:cacheprovider -q -s --durations=0
echo "test-compose: passed in $(( $(date +%s) - started_at )) s"
