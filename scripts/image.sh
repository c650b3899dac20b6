#!/usr/bin/env bash
# Build the meshproxy container image for ARCH (amd64|arm64) on this machine,
# with no container registry and no container daemon:
#   1. a Debian bookworm minbase root filesystem from the configured apt mirror
#      (debootstrap), imported as localhost/deb-minbase:bookworm-ARCH;
#   2. podman (with runc: crun fails on this host's hybrid cgroups) builds
#      Dockerfile.ARCH on top of it as localhost/meshproxy:ARCH.
# arm64 runs under qemu-user through binfmt_misc.
# Prints how long each step took and the image size.
#
# Usage: scripts/image.sh ARCH [--rebuild-base]
# Env:   ROOTFS_DIR   where root filesystems are kept (default /var/tmp/meshproxy-rootfs)
#        MIRROR       Debian mirror (default: the first .../debian URI in /etc/apt/sources*)
#        IMAGE_TAG    result tag (default localhost/meshproxy:ARCH)
#        BASE_IMAGE   skip debootstrap and build on this image instead (e.g. python:3.11-slim-bookworm)
#        BUILD_CA     CA bundle pip must trust inside the build (default: $PIP_CERT, else the
#                     host's /etc/ssl/certs/ca-certificates.crt), for egress through a TLS proxy
# Needs root and: podman runc debootstrap (+ qemu-user-static binfmt-support for arm64).
set -euo pipefail

ARCH="${1:-}"
REBUILD_BASE="${2:-}"
case "$ARCH" in
  amd64 | arm64) ;;
  *) echo "usage: $0 amd64|arm64 [--rebuild-base]" >&2; exit 64 ;;
esac

cd "$(dirname "$0")/.."
ROOTFS_DIR="${ROOTFS_DIR:-/var/tmp/meshproxy-rootfs}"
IMAGE_TAG="${IMAGE_TAG:-localhost/meshproxy:$ARCH}"
MINBASE="localhost/deb-minbase:bookworm-$ARCH"
# Every run/build needs explicit ulimits: the hard NOFILE limit here (20000) is
# below podman's default 1048576, and even root cannot raise it.
ULIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
PODMAN=(podman --runtime runc)

step_start=0
step() { step_start=$(date +%s.%N); echo "== $*"; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
took() { echo "   took $(since "$step_start") s"; }

need() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if ((${#missing[@]})); then
    echo "missing tools: ${missing[*]}; install with: apt-get install -y podman runc debootstrap" \
         "qemu-user-static binfmt-support" >&2
    exit 69
  fi
}
need podman runc

# The first plain Debian archive URI configured for apt (not -security, not third-party).
debian_mirror() {
  local uri
  uri=$(
    {
      grep -hE '^\s*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{for (i = 2; i <= NF; i++) print $i}'
      grep -hE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        sed -E 's/\[[^]]*\]//' | awk '{print $2}'
    } | grep -E '/debian/?$' | head -n1
  )
  echo "${uri:-http://deb.debian.org/debian}"
}

enable_arm64_emulation() {
  need qemu-aarch64-static update-binfmts
  if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  if [ "$(cat /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null | head -n1)" != "enabled" ]; then
    echo "qemu-aarch64 binfmt handler is not enabled" >&2
    exit 69
  fi
}

# The security archive next to it, if apt is configured with one.
debian_security_mirror() {
  local uri
  uri=$(
    {
      grep -hE '^\s*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{for (i = 2; i <= NF; i++) print $i}'
      grep -hE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        sed -E 's/\[[^]]*\]//' | awk '{print $2}'
    } | grep -E '/debian-security/?$' | head -n1
  )
  echo "${uri:-http://deb.debian.org/debian-security}"
}

# What debian:bookworm-slim does, so the base stays small: no docs (copyright files
# kept), man pages, info or translations, now or in later apt installs, and no apt
# package caches in layers. Idempotent.
slim_rootfs() {
  local rootfs="$1"
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/90meshproxy-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
  cat >"$rootfs/etc/apt/apt.conf.d/90meshproxy-slim" <<'CFG'
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT::Install-Recommends "false";
CFG
  find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/usr/share/lintian/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
}

build_base() {
  local rootfs="$ROOTFS_DIR/bookworm-$ARCH" mirror
  mirror="${MIRROR:-$(debian_mirror)}"
  need debootstrap
  df -h "$(dirname "$ROOTFS_DIR")" | tail -n1 | awk '{print "   disk free: " $4}'
  if [ ! -x "$rootfs/usr/bin/python3" ]; then
    step "debootstrap bookworm minbase ($ARCH) from $mirror"
    rm -rf "$rootfs"
    mkdir -p "$ROOTFS_DIR"
    debootstrap --arch="$ARCH" --variant=minbase --include=python3 bookworm "$rootfs" "$mirror" \
      >"$ROOTFS_DIR/debootstrap-$ARCH.log" 2>&1 ||
      { tail -n 20 "$ROOTFS_DIR/debootstrap-$ARCH.log" >&2; exit 1; }
    took
  fi
  # Later apt installs (build tools, iptables) get current and security versions.
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
    "$mirror" "$mirror" "${SECURITY_MIRROR:-$(debian_security_mirror)}" >"$rootfs/etc/apt/sources.list"
  slim_rootfs "$rootfs"
  step "podman import $MINBASE ($(du -sh "$rootfs" | cut -f1))"
  tar -C "$rootfs" -c . | "${PODMAN[@]}" import --arch "$ARCH" --change 'CMD ["/bin/bash"]' - "$MINBASE" >/dev/null
  took
}

if [ "$ARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then
  enable_arm64_emulation
fi

if [ -n "${BASE_IMAGE:-}" ]; then
  base="$BASE_IMAGE"
  pull=(--pull=missing)
else
  base="$MINBASE"
  pull=(--pull=never)  # a local tag must never trigger a registry lookup
  if [ "$REBUILD_BASE" = --rebuild-base ] || ! "${PODMAN[@]}" image exists "$MINBASE"; then
    build_base
  fi
fi

[ -f pyproject.toml ] || { echo "pyproject.toml is missing: nothing to build yet" >&2; exit 69; }

# pip in the build stage must trust what the host trusts (an intercepting egress
# proxy's CA, for one): the host bundle is mounted for RUN steps only and named by
# the PIP_CERT build argument, so it never ends up in a layer.
ca_args=()
BUILD_CA="${BUILD_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
if [ -f "$BUILD_CA" ]; then
  ca_args=(--volume "$BUILD_CA:/run/meshproxy-build-ca.crt:ro" --build-arg PIP_CERT=/run/meshproxy-build-ca.crt)
fi

step "podman build $IMAGE_TAG from $base (Dockerfile.$ARCH)"
# --network=host: the build stage fetches dependency wheels from PyPI and
# packages from the Debian mirror; the default bridge would leave NETAVARK
# chains in the host's iptables.
"${PODMAN[@]}" build "${pull[@]}" --network=host "${ULIMITS[@]}" --platform "linux/$ARCH" "${ca_args[@]}" \
  --build-arg "BASE_IMAGE=$base" -f "Dockerfile.$ARCH" -t "$IMAGE_TAG" .
took
build_seconds=$(since "$step_start")

size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE_TAG")
awk -v t="$IMAGE_TAG" -v s="$build_seconds" -v b="$size" \
  'BEGIN { printf "image %s: built in %.0f s, size %.1f MB (%d bytes)\n", t, s, b / 1e6, b }'
