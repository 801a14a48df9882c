#!/usr/bin/env bash
# Build the dicomnode image with podman, offline.
#
#   docker/build.sh                # base (cached) + wheelhouse (cached) + image
#   docker/build.sh --stage-only   # only prepare docker/.build (e.g. for `docker compose build`)
#
# Steps:
#  1. base image: unless BASE is given, a Debian bookworm minbase made with
#     debootstrap (python3, venv, pip, CA certificates) and `podman import`-ed as
#     localhost/dicomnode-base:bookworm. The root file system tarball is cached in
#     $DICOMNODE_PODMAN_CACHE (default /var/cache/dicomnode-podman), so reruns skip
#     debootstrap even after the podman storage was wiped.
#  2. wheelhouse: every runtime dependency of pyproject.toml (no torch: the image
#     runs onnxruntime only) as wheels, made on the host with pip and cached under
#     the cache directory, keyed by the dependency list.
#  3. build context docker/.build: Dockerfile, config, entry point, health check,
#     wheelhouse (hard links) and app/ (dicomnode/, migrations/, models/).
#  4. podman build --format docker (keeps HEALTHCHECK) with --pull=never.
#
# Environment: IMAGE (default localhost/dicomnode:latest), DICOMNODE_BASE_IMAGE (name
# of the debootstrap base, default localhost/dicomnode-base:bookworm), BASE (a base image to
# use instead of the debootstrap one, e.g. python:3.11-slim where a registry is
# reachable), DEBIAN_MIRROR (default: the mirror apt uses), PYTHON (host Python
# with pip, default .venv/bin/python), CONTAINERS_CONF.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DICOMNODE_PODMAN_CACHE:-/var/cache/dicomnode-podman}"
IMAGE="${IMAGE:-localhost/dicomnode:latest}"
LOCAL_BASE="${DICOMNODE_BASE_IMAGE:-localhost/dicomnode-base:bookworm}"
BASE="${BASE:-$LOCAL_BASE}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CONTEXT="$ROOT/docker/.build"
STAGE_ONLY=0

for arg in "$@"; do
    case "$arg" in
        --stage-only) STAGE_ONLY=1 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

say() { printf '[build.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

mkdir -p "$CACHE"
# One build at a time: concurrent test sessions share docker/.build and the cache.
exec 9>"$CACHE/build.lock"
if command -v flock >/dev/null; then
    flock 9
fi
# Debian's podman in this kind of machine needs runc, cgroupfs and no default
# ulimits (the sandbox refuses to raise them).
if [ -z "${CONTAINERS_CONF:-}" ]; then
    export CONTAINERS_CONF="$CACHE/containers.conf"
    if [ ! -f "$CONTAINERS_CONF" ]; then
        printf '[containers]\ndefault_ulimits = []\n' > "$CONTAINERS_CONF"
    fi
fi
pm() { podman --runtime runc --cgroup-manager=cgroupfs "$@"; }

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local m=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        m="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
    fi
    if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
        m="$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)"
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

build_base() {
    if pm image exists "$LOCAL_BASE"; then
        say "base image $LOCAL_BASE present"
        return
    fi
    local tarball="$CACHE/base-bookworm.tar"
    if [ ! -f "$tarball" ]; then
        command -v debootstrap >/dev/null || { echo "build.sh: debootstrap missing (apt-get install debootstrap)" >&2; exit 1; }
        local mirror rootfs="$CACHE/rootfs.tmp"
        mirror="$(debian_mirror)"
        say "debootstrap bookworm from $mirror (about a minute)"
        rm -rf "$rootfs"
        debootstrap --variant=minbase \
            --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$rootfs" "$mirror" > "$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
        # Smaller image: apt lists and caches are not needed at run time.
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
               "$rootfs"/var/cache/apt/archives/*.deb
        tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    say "importing $tarball as $LOCAL_BASE"
    pm import --change 'CMD ["/bin/bash"]' "$tarball" "$LOCAL_BASE" >/dev/null
}

requirements() {
    # Runtime dependencies straight from pyproject.toml (one source of truth).
    "$PYTHON" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
bad = [d for d in deps if d.lower().startswith("torch")]
if bad:
    sys.exit(f"torch must not be a runtime dependency of the image: {bad}")
print("\n".join(deps))
PY
}

build_wheelhouse() {
    local req key
    req="$(requirements)"
    key="$(printf '%s\n%s\n' "$req" "$("$PYTHON" -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-16)"
    WHEELHOUSE="$CACHE/wheelhouse-$key"
    if [ -f "$WHEELHOUSE/requirements.txt" ]; then
        say "wheelhouse $WHEELHOUSE present"
        return
    fi
    say "building wheelhouse $WHEELHOUSE"
    rm -rf "$WHEELHOUSE.tmp"
    mkdir -p "$WHEELHOUSE.tmp"
    printf '%s\n' "$req" > "$WHEELHOUSE.tmp/requirements.in"
    # Wheels for the image's Python (3.11, x86_64 glibc): the host venv's
    # Python must match, which build.sh checks below.
    "$PYTHON" -m pip wheel --quiet --wheel-dir "$WHEELHOUSE.tmp" -r "$WHEELHOUSE.tmp/requirements.in"
    cp "$WHEELHOUSE.tmp/requirements.in" "$WHEELHOUSE.tmp/requirements.txt"
    mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"
}

stage_context() {
    say "staging build context $CONTEXT"
    rm -rf "$CONTEXT"
    mkdir -p "$CONTEXT/app"
    cp "$ROOT/docker/Dockerfile" "$ROOT/docker/node.yaml" "$ROOT/docker/entrypoint.sh" \
       "$ROOT/docker/healthcheck.py" "$CONTEXT/"
    cp -al "$WHEELHOUSE" "$CONTEXT/wheelhouse" 2>/dev/null || cp -a "$WHEELHOUSE" "$CONTEXT/wheelhouse"
    cp -a "$ROOT/pyproject.toml" "$ROOT/dicomnode" "$ROOT/migrations" "$CONTEXT/app/"
    mkdir -p "$CONTEXT/app/models"
    if [ -d "$ROOT/models" ]; then
        cp -a "$ROOT/models/." "$CONTEXT/app/models/"
    fi
    find "$CONTEXT/app" -name __pycache__ -type d -prune -exec rm -rf {} +
    find "$CONTEXT/app" -name '*.pyc' -delete
}

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || {
    echo "build.sh: $PYTHON must be Python 3.11 (the wheelhouse must match the image's Python)" >&2
    exit 1
}
build_wheelhouse
stage_context
if [ "$STAGE_ONLY" = 1 ]; then
    say "context ready: $CONTEXT"
    exit 0
fi
if [ "$BASE" = "$LOCAL_BASE" ]; then
    build_base
fi
say "podman build $IMAGE (base $BASE)"
pm build --format docker --pull=never --network host --build-arg "BASE=$BASE" \
    -t "$IMAGE" -f "$CONTEXT/Dockerfile" "$CONTEXT"
say "built $IMAGE"
