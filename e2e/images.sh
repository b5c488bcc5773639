#!/usr/bin/env bash
# Build the MetaStore runtime image (`metastore:dev`) from the binaries built on this machine,
# without any image registry:
#
#   1. the base image the Dockerfile names (`debian:bookworm-slim`), made with
#      `debootstrap --variant=minbase bookworm` + `docker import`, only when it is missing;
#   2. `docker build --target runtime-prebuilt` with the host binaries as the `bin` context.
#
# Usage: e2e/images.sh            (as root, or as a user of the docker group with sudo for
#                                  debootstrap; Debian's debootstrap package)
#
# Environment:
#   IMAGE          tag to build                      (default metastore:dev)
#   BASE_IMAGE     the Dockerfile's base image       (default debian:bookworm-slim)
#   BIN_DIR        directory holding metastore, metastore-ctl and metastore-operator
#                  (default $CARGO_TARGET_DIR/release, else ~/.cache/metastore/target/release)
#   DEBIAN_MIRROR  mirror for debootstrap            (default: the host's first Debian mirror,
#                                                      else http://deb.debian.org/debian)
#   LABELS         extra image labels, space-separated key=value pairs (default: none), e.g.
#                  IMAGE=metastore:dev-next LABELS=io.metastore.build=next e2e/images.sh
#                  (e2e/test_image_cluster.py's "newer build" for its rolling upgrade)
#
# BuildKit or not: with `docker buildx` the build is exactly
#   docker build --target runtime-prebuilt --build-context bin=$BIN_DIR -t $IMAGE .
# Without it (Debian's docker.io 20.10 has no buildx, and the legacy builder knows neither
# named contexts nor `RUN --mount`), `COPY --from=bin` names an image instead of a context, so
# the two binaries are imported as a throw-away local image `bin:latest` for the duration of
# the build (under a lock, removed afterwards). Nothing is pulled either way.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-metastore:dev}"
BASE_IMAGE="${BASE_IMAGE:-debian:bookworm-slim}"
if [[ -z "${BIN_DIR:-}" ]]; then
  BIN_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/metastore/target}/release"
fi

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'images.sh: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

command -v docker >/dev/null || die "docker not found"
docker info >/dev/null 2>&1 || die "no docker daemon reachable (docker info failed)"
for b in metastore metastore-ctl metastore-operator; do
  [[ -x "$BIN_DIR/$b" ]] || die "$BIN_DIR/$b missing: cargo build --release --bin metastore --bin metastore-ctl --bin metastore-operator"
done

# Only one build at a time on this daemon: the legacy path uses a fixed image name.
exec 9>"${TMPDIR:-/tmp}/metastore-images.lock"
flock 9

# The release profile keeps line tables for backtraces and profiles; the image does not need
# them (they triple its size). Stage stripped copies and build from those.
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/metastore-bin.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
for b in metastore metastore-ctl metastore-operator; do
  strip --strip-debug -o "$STAGE/$b" "$BIN_DIR/$b"
done
BIN_DIR="$STAGE"

debian_mirror() {
  if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
  local m
  m="$(grep -rhoE '(URIs:|^deb)[[:space:]]+https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | grep -oE 'https?://[^[:space:]]+' | grep -v -- '-security' | head -n1 || true)"
  echo "${m:-http://deb.debian.org/debian}"
}

# ---- 1. the base image ---------------------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  log "base image $BASE_IMAGE present"
else
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install -y debootstrap)"
  [[ "$(id -u)" = 0 ]] || die "debootstrap needs root to build $BASE_IMAGE"
  start="$(now)"
  rootfs="$(mktemp -d "${TMPDIR:-/tmp}/metastore-rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  mirror="$(debian_mirror)"
  log "building $BASE_IMAGE: debootstrap --variant=minbase bookworm ($mirror)"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -n 30 "$rootfs.log" >&2; rm -f "$rootfs.log"; die "debootstrap failed"; }
  rm -f "$rootfs.log"
  # Trim what Debian's own slim images drop: package caches, apt lists, docs, man pages,
  # translations (dpkg keeps working; `apt-get update` brings the lists back).
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
         "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
         "$rootfs"/usr/share/locale/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
  tar --numeric-owner -C "$rootfs" -c . \
    | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase bookworm (e2e/images.sh)" \
        - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  log "base image $BASE_IMAGE built in $(since "$start") s"
fi

# ---- 2. the runtime image ------------------------------------------------------------------
start="$(now)"
cd "$ROOT"
label_args=()
for l in ${LABELS:-}; do
  [[ "$l" == *=* ]] || die "LABELS: '$l' is not key=value"
  label_args+=(--label "$l")
done
if docker buildx version >/dev/null 2>&1; then
  log "docker build (BuildKit) --target runtime-prebuilt --build-context bin=$BIN_DIR -t $IMAGE"
  docker build --target runtime-prebuilt --build-context "bin=$BIN_DIR" \
    --build-arg "DEBIAN=$BASE_IMAGE" ${label_args[@]+"${label_args[@]}"} -t "$IMAGE" .
else
  log "docker build (legacy builder: no buildx) --target runtime-prebuilt -t $IMAGE, bin = a local image"
  # A bin:latest left by an interrupted run of this script is replaced; any other is not ours.
  if owner="$(docker image inspect -f '{{index .Config.Labels "io.metastore.e2e"}}' bin:latest 2>/dev/null)"; then
    [[ "$owner" = images.sh ]] || die "an image bin:latest exists that images.sh did not make; remove it and retry"
    docker rmi -f bin:latest >/dev/null
  fi
  trap 'docker rmi -f bin:latest >/dev/null 2>&1 || true; rm -rf "$STAGE"' EXIT
  tar --numeric-owner --owner=0 --group=0 -C "$BIN_DIR" -c metastore metastore-ctl metastore-operator \
    | docker import --change 'LABEL io.metastore.e2e=images.sh' \
        --message "metastore binaries (e2e/images.sh, temporary)" - bin:latest >/dev/null
  # (The CLI prints a deprecation notice for the legacy builder; it is expected here.)
  DOCKER_BUILDKIT=0 docker build --target runtime-prebuilt \
    --build-arg "DEBIAN=$BASE_IMAGE" ${label_args[@]+"${label_args[@]}"} -t "$IMAGE" .
  docker rmi -f bin:latest >/dev/null 2>&1 || true
  trap 'rm -rf "$STAGE"' EXIT
fi
docker image inspect "$IMAGE" >/dev/null || die "docker build did not produce $IMAGE"
log "image $IMAGE built in $(since "$start") s"
