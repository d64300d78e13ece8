#!/usr/bin/env bash
# Builds the stand-ins for the compose stack's base images, once per machine: no image registry is
# reachable here, so a Debian bookworm root filesystem made by debootstrap from Debian's packages
# is imported as a base, and each stand-in is built on it. Tags live under batchgen-standin/ so
# they never shadow a real image; the test passes them to the Dockerfiles and the compose file.
# Each image carries a label with the hash of what made it: a change here rebuilds it.
set -euo pipefail
shopt -s nullglob
here="$(cd "$(dirname "$0")" && pwd)"
prefix=batchgen-standin
ca=/etc/ssl/certs/ca-certificates.crt

label() { docker image inspect -f '{{index .Config.Labels "batchgen.standin"}}' "$1" 2>/dev/null || true; }

base_key=$( (echo "bookworm minbase v1"; cat "$ca") | sha256sum | cut -c1-16)
base="$prefix/debian:bookworm"
if [ "$(label "$base")" != "$base_key" ]; then
  echo "stand-ins: debootstrap bookworm (once per machine)"
  root=$(mktemp -d /var/tmp/batchgen-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" http://deb.debian.org/debian \
    > "$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
  rm -f "$root.log"
  # pip in a build reaches the package index through this machine's certificate authorities.
  cp "$ca" "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change "LABEL batchgen.standin=$base_key" --change 'CMD ["bash"]' - "$base" >/dev/null
  rm -rf "$root"; trap - EXIT
fi

# name -> Dockerfile
declare -A standins=(
  [python:3.11-slim]=python.Dockerfile
  [redis:7-alpine]=redis.Dockerfile
  [postgres:16-alpine]=postgres.Dockerfile
  [cuda:12-runtime]=cuda.Dockerfile
)
for name in "${!standins[@]}"; do
  file=${standins[$name]}
  inputs=("$here/$file" "$here/${file%.Dockerfile}"-*.sh)  # its Dockerfile and what it copies
  key=$( (echo "$base_key"; cat "${inputs[@]}") | sha256sum | cut -c1-16)
  if [ "$(label "$prefix/$name")" != "$key" ]; then
    echo "stand-ins: building $prefix/$name"
    old=$(docker image inspect -f '{{.Id}}' "$prefix/$name" 2>/dev/null || true)
    log=$(mktemp)
    docker build -q --force-rm --network host --build-arg "BASE=$base" --label "batchgen.standin=$key" \
      -f "$here/$file" -t "$prefix/$name" "$here" >"$log" 2>&1 || { tail -30 "$log"; rm -f "$log"; exit 1; }
    rm -f "$log"
    # The image it replaces, now untagged (kept if a container still uses it).
    [ -z "$old" ] || docker rmi "$old" >/dev/null 2>&1 || true
  fi
done
