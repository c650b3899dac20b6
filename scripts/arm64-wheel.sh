#!/usr/bin/env bash
# Build the meshproxy wheel for linux/aarch64 natively under qemu-user and check it
# (issue 6: "the arm64 wheel imports under qemu, and its Cython module is the compiled
# one, not the twin"), with no container runtime and no registry:
#   1. host tools (qemu-user-static binfmt-support debootstrap mmdebstrap) and the
#      qemu-aarch64 binfmt_misc handler;
#   2. a cached arm64 Debian bookworm root filesystem with python3, python3-venv,
#      python3-dev, gcc and libc6-dev, built by `mmdebstrap --variant=extract`: apt
#      resolves and downloads, the packages are unpacked natively and no maintainer
#      script runs under qemu (~20 s, where a full debootstrap takes ~6 min); then
#      passwd/group and ld.so.cache are set up and the standard library is
#      byte-compiled by the host's python3.11 (.pyc files do not depend on the CPU).
#      Each run mounts an overlay on it, so runs never change it. scripts/image.sh's
#      rootfs is used instead when it has all of the above (by default it has not);
#   3. the host's python3 runs pip (the rootfs's own pip wheel) to download the
#      build requirements and dependencies of pyproject.toml as cp311 aarch64 wheels:
#      pip's index handling is CPU-bound and ~10x slower under qemu;
#   4. the project's files (git's tracked + untracked-but-not-ignored files: no .venv,
#      build artifacts or host .so) are built into a wheel INSIDE the chroot
#      (`pip wheel --no-deps`; setuptools and Cython from the wheelhouse, unpacked by
#      the host's pip, else pip's isolated build env; the aarch64 gcc compiles under
#      qemu, one extension per CPU); on the host, the file name must carry an aarch64
#      tag and proxy/_native/relay*.so (and every other .so) must be an AArch64 ELF
#      (scripts/arm64-wheel-check.py wheel);
#   5. the wheel and its dependencies (binary wheels only) go into a fresh venv in the
#      chroot; under qemu: platform.machine() == "aarch64", relay IMPLEMENTATION ==
#      "cython", and `python -m proxy run` (identity disabled, 127.0.0.1 ports) answers
#      /ready, relays bytes to an echo server and exits 0 on SIGTERM (... smoke).
# Prints the time of each step and a final PASS / FAIL line; exit status 0 only on PASS.
# Cleans up its processes (every process whose root is the run's chroot) and mounts.
#
# Usage: scripts/arm64-wheel.sh        (as root, on Debian 12 amd64 or natively on arm64)
# Env:   ARM64_CACHE_DIR   rootfs, wheelhouse, logs, built wheel (default /var/tmp/meshproxy-arm64-rootfs)
#        ARM64_REBUILD=1   rebuild the cached rootfs
#        ARM64_ROOTFS_METHOD  extract (default) | debootstrap (fully configured minbase, ~6 min)
#        ARM64_WHEEL_SOURCE   worktree (default) | head (git archive HEAD)
#        ARM64_CFLAGS      appended to Python's compiler flags for the extensions (default -g0)
#        MIRROR            Debian mirror (default: the first .../debian URI in /etc/apt/sources*)
#        PIP_CERT          CA bundle pip trusts, on the host and in the chroot (default
#                          /etc/ssl/certs/ca-certificates.crt): egress through an intercepting TLS proxy
set -euo pipefail

cd "$(dirname "$0")/.."
SRC=$PWD
CACHE_DIR="${ARM64_CACHE_DIR:-/var/tmp/meshproxy-arm64-rootfs}"
ROOTFS="$CACHE_DIR/rootfs"
LOGS="$CACHE_DIR/logs"
WHEELHOUSE="$CACHE_DIR/wheelhouse"
IMAGE_ROOTFS="${ROOTFS_DIR:-/var/tmp/meshproxy-rootfs}/bookworm-arm64"  # scripts/image.sh's
METHOD="${ARM64_ROOTFS_METHOD:-extract}"
PACKAGES="python3,python3-venv,python3-dev,gcc,libc6-dev,libssl-dev"
RECIPE="meshproxy-arm64-rootfs v2 bookworm $METHOD $PACKAGES"  # what a cached rootfs must match
CA="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
CHECK="$SRC/scripts/arm64-wheel-check.py"
CFLAGS_EXTRA="${ARM64_CFLAGS--g0}"  # appended to Python's compiler flags (as CPPFLAGS)
T_BUILD=900 T_INSTALL=600 T_SMOKE=300  # bounds (s) of the steps under qemu

t0=$(date +%s.%N)
step_start=$t0
current="start"
passed=0
run_dir=""
root=""
wheel_name=""
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
step() { current="$*"; step_start=$(date +%s.%N); echo "== $*"; }
took() { echo "   took $(since "$step_start") s${1:+: $1}"; }
die() { echo "error: $*" >&2; exit 1; }

# Kill every process running inside this run's chroot (the proxy, its workers, pip, gcc).
kill_chroot_procs() {
  local p r
  [ -n "$root" ] || return 0
  for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2>/dev/null) || continue
    if [ "$r" = "$root" ]; then kill -KILL "${p#/proc/}" 2>/dev/null || true; fi
  done
}

mounts_under() { awk -v d="$1/" 'index($2 "/", d) == 1 { print $2 }' /proc/self/mounts; }

exec 3>&1 4>&2  # the terminal, for cleanup: a trap may run while a command's output goes to a log
cleanup() {
  local rc=$? m
  set +e
  exec 1>&3 2>&4
  if [ -n "$run_dir" ]; then
    kill_chroot_procs
    sleep 0.2
    for m in $(mounts_under "$run_dir" | sort -r); do  # deepest first
      umount "$m" 2>/dev/null || umount -l "$m"
    done
    if [ -n "$(mounts_under "$run_dir")" ]; then
      echo "warning: mounts left under $run_dir; not removing it" >&2
    else
      rm -rf --one-file-system "$run_dir"
    fi
  fi
  if [ "$passed" = 1 ]; then
    echo "PASS arm64 wheel $wheel_name: built natively for aarch64 under qemu, compiled relay, proxy smoke ok ($(since "$t0") s)"
  else
    echo "FAIL arm64 wheel: step '$current' failed (exit $rc) after $(since "$t0") s; logs in $LOGS"
    [ "$rc" != 0 ] || rc=1
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" = 0 ] || die "must run as root (chroot, mount, binfmt_misc)"
command -v python3 >/dev/null || die "python3 is needed on the host"

# The first plain Debian archive URI configured for apt (as scripts/image.sh picks it).
debian_mirror() {
  local uri
  uri=$(
    {
      grep -hE '^\s*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{for (i = 2; i <= NF; i++) print $i}'
      grep -hE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        sed -E 's/\[[^]]*\]//' | awk '{print $2}'
    } | grep -E '/debian/?$' | head -n1
  ) || true
  echo "${uri:-http://deb.debian.org/debian}"
}

# Environments for pip, on the host and in the chroot: nothing from the caller but proxy
# and index settings (PIP_FIND_LINKS and the like may name host paths).
pass_env=()
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
  if [ -n "${!v:-}" ]; then pass_env+=("$v=${!v}"); fi
done
pip_env=(PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PIP_NO_INPUT=1 PIP_DEFAULT_TIMEOUT=60 "${pass_env[@]}")
host_env=(env -i "HOME=${HOME:-/root}" LANG=C.UTF-8 "PATH=$PATH" "PIP_CERT=$CA" "${pip_env[@]}")
chroot_env=(
  env -i HOME=/root LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  PIP_CERT=/run/meshproxy-ca.crt SSL_CERT_FILE=/run/meshproxy-ca.crt PIP_NO_COMPILE=1 "${pip_env[@]}"
)
# in_chroot SECONDS CMD...: run CMD in the run's chroot, bounded. In the background with
# `wait`, so that a SIGTERM/SIGINT to this script runs its traps (cleanup) at once.
in_chroot() {
  local secs=$1
  shift
  timeout --kill-after=10 "$secs" chroot "$root" "${chroot_env[@]}" "$@" 3>&- 4>&- 5>&- &
  wait "$!"
}

# ------------------------------------------------------------------ 1. host tools, qemu
step "host tools and qemu-aarch64 binfmt handler"
native=0
[ "$(uname -m)" = aarch64 ] && native=1
tools=(chroot timeout tar flock)
[ "$native" = 1 ] || tools+=(qemu-aarch64-static update-binfmts)
if [ "$METHOD" = debootstrap ]; then tools+=(debootstrap); else tools+=(mmdebstrap); fi
missing=()
for t in "${tools[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
if ((${#missing[@]})); then
  pkgs="debootstrap mmdebstrap"
  [ "$native" = 1 ] || pkgs="qemu-user-static binfmt-support $pkgs"
  echo "   apt-get install $pkgs (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; } ||
    die "apt-get install $pkgs failed"
fi
qemu_interp="" qemu_fixed=1
if [ "$native" = 0 ]; then
  if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
  fi
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  handler=/proc/sys/fs/binfmt_misc/qemu-aarch64
  [ "$(head -n1 "$handler" 2>/dev/null)" = enabled ] ||
    die "the qemu-aarch64 binfmt_misc handler is not enabled (is qemu-user-static installed?)"
  qemu_interp=$(awk '$1 == "interpreter" { print $2 }' "$handler")
  # F: the kernel opens the interpreter at registration, so a chroot needs no copy of it.
  grep -qE '^flags:.*F' "$handler" || qemu_fixed=0
  took "$(qemu-aarch64-static --version | head -n1), flags $(awk '$1 == "flags:" { print $2 }' "$handler")"
else
  took "native aarch64 host"
fi

# ------------------------------------------------------------------ 2. rootfs
# rootfs_ok DIR: the files a native aarch64 build needs are there (cheap, no qemu).
rootfs_ok() {
  local d=$1
  [ -x "$d/usr/bin/python3" ] && [ -x "$d/usr/bin/gcc" ] && [ -e "$d/etc/ld.so.cache" ] &&
    compgen -G "$d/usr/include/python3*/Python.h" >/dev/null &&
    compgen -G "$d/usr/share/python-wheels/pip-*.whl" >/dev/null &&
    [ -e "$d/usr/include/aarch64-linux-gnu/bits/libc-header-start.h" ] &&
    [ -e "$d/usr/include/openssl/evp.h" ] &&  # native/records.pyx calls libcrypto
    [ "$(od -An -tu2 -j18 -N2 "$(readlink -f "$d/usr/bin/python3")" | tr -d ' ')" = 183 ]  # ELF e_machine AArch64
}

# The rootfs's python3.X, and whether the host's python3 has the same X (then its .pyc
# files are valid in the chroot: the bytecode magic depends on the version only).
rootfs_pyver() { basename "$(readlink -f "$1/usr/bin/python3")" | sed 's/^python//'; }
host_pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# host_compile ROOT DIR...: byte-compile DIR (a chroot path) with the host's python3.
host_compile() {
  local r=$1 d
  shift
  [ "$host_pyver" = "$(rootfs_pyver "$r")" ] || return 0
  for d in "$@"; do python3 -m compileall -q -j0 -s "$r" -p / "$r$d" >/dev/null 2>&1 || true; done
}

build_rootfs() {
  local mirror new="$CACHE_DIR/rootfs.new" log="$LOGS/rootfs-build.log"
  mirror="${MIRROR:-$(debian_mirror)}"
  for d in "$new" "$ROOTFS"; do
    [ -e "$d" ] || continue
    [ -z "$(mounts_under "$d")" ] || die "something is mounted under $d; not removing it"
    rm -rf --one-file-system "$d"
  done
  if [ "$METHOD" = debootstrap ]; then
    echo "   debootstrap --variant=minbase (maintainer scripts under qemu) from $mirror"
    debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" bookworm "$new" "$mirror" >"$log" 2>&1 3>&- 4>&- 5>&- ||
      { tail -n 20 "$log" >&2; die "debootstrap failed (log: $log)"; }
  else
    # Essential packages are named: nothing depends on them, and extract installs only
    # what was asked for and its dependencies. The script's fds 3-5 are closed for it:
    # apt's hooks run `cat >&N` in dash, which cannot take N > 9.
    echo "   mmdebstrap --variant=extract from $mirror"
    mmdebstrap --mode=root --arch=arm64 --variant=extract \
      --setup-hook=/usr/share/mmdebstrap/hooks/merged-usr/setup00.sh \
      --include="base-files,base-passwd,libc-bin,dash,bash,coreutils,$PACKAGES" \
      bookworm "$new" "deb $mirror bookworm main" >"$log" 2>&1 3>&- 4>&- 5>&- ||
      { tail -n 20 "$log" >&2; die "mmdebstrap failed (log: $log)"; }
    # What base-passwd's and libc-bin's maintainer scripts would have done.
    [ -e "$new/etc/passwd" ] || cp "$new/usr/share/base-passwd/passwd.master" "$new/etc/passwd"
    [ -e "$new/etc/group" ] || cp "$new/usr/share/base-passwd/group.master" "$new/etc/group"
    mkdir -p "$new/proc" "$new/sys" "$new/dev" "$new/tmp" "$new/run" "$new/root"
    chmod 1777 "$new/tmp"
    timeout 120 chroot "$new" /sbin/ldconfig || die "ldconfig in the new rootfs failed (qemu?)"
  fi
  host_compile "$new" "/usr/lib/python$(rootfs_pyver "$new")"
  rootfs_ok "$new" || die "the new rootfs at $new lacks python3/gcc/Python.h/pip wheel (log: $log)"
  echo "$RECIPE" >"$new/.meshproxy-arm64-rootfs"
  mv "$new" "$ROOTFS"
}

step "arm64 rootfs"
mkdir -p "$CACHE_DIR/runs" "$CACHE_DIR/out" "$LOGS" "$WHEELHOUSE"
# One run at a time per cache: a rebuild must not pull the rootfs from under another run.
exec 5>"$CACHE_DIR/lock"
flock -w 1800 5 || die "another scripts/arm64-wheel.sh still holds $CACHE_DIR/lock after 30 min"
rm -f "$LOGS"/*.offline
for f in "$LOGS"/*.log; do  # keep the previous run's logs as *.log.old
  if [ -e "$f" ]; then mv -f "$f" "$f.old"; fi
done
lower=""
if [ "${ARM64_REBUILD:-0}" != 1 ]; then
  if [ "$(cat "$ROOTFS/.meshproxy-arm64-rootfs" 2>/dev/null)" = "$RECIPE" ] && rootfs_ok "$ROOTFS"; then
    lower=$ROOTFS
    took "cached $ROOTFS ($(du -sh "$ROOTFS" | cut -f1))"
  elif rootfs_ok "$IMAGE_ROOTFS"; then
    lower=$IMAGE_ROOTFS  # only ever a read-only lower layer: image.sh's base stays as it is
    took "reusing scripts/image.sh's $IMAGE_ROOTFS"
  fi
fi
if [ -z "$lower" ]; then
  [ ! -d "$IMAGE_ROOTFS" ] || echo "   ($IMAGE_ROOTFS has no gcc/python3-dev/python3-venv: not reusable)"
  build_rootfs
  lower=$ROOTFS
  took "built $ROOTFS ($METHOD, $(du -sh "$ROOTFS" | cut -f1))"
fi
pyver=$(rootfs_pyver "$lower")
pip_whl=$(compgen -G "$lower/usr/share/python-wheels/pip-*.whl" | head -n1)

# ------------------------------------------------------------------ per-run chroot
step "chroot: overlay on the rootfs, /proc /sys /dev, project files, venv with pip"
run_dir=$(mktemp -d "$CACHE_DIR/runs/run.XXXXXX")
root="$run_dir/root"
mkdir -p "$run_dir/upper" "$run_dir/work" "$root"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$run_dir/upper,workdir=$run_dir/work" "$root" ||
  die "cannot mount an overlay on $lower"
# Private mounts: under systemd's shared propagation a tmpfs on the bind of /dev would
# also show up on the host's /dev/shm.
mount --make-private "$root"
mount -t proc proc "$root/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount --make-private "$root/dev"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$root/dev/shm"
mkdir -p "$root/wheels"
mount --bind -o ro "$WHEELHOUSE" "$root/wheels"
if [ "$native" = 0 ] && [ "$qemu_fixed" = 0 ]; then
  mkdir -p "$root$(dirname "$qemu_interp")" && cp "$qemu_interp" "$root$qemu_interp"
fi
[ -f "$CA" ] || die "CA bundle $CA not found (set PIP_CERT)"
cp "$CA" "$root/run/meshproxy-ca.crt"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
cp /etc/hosts "$root/etc/hosts" 2>/dev/null || true
cp "$CHECK" "$root/run/arm64-wheel-check.py"
mkdir -p "$root/src" "$root/out"
if [ "${ARM64_WHEEL_SOURCE:-worktree}" = head ]; then
  git -C "$SRC" archive --format=tar HEAD | tar -x -C "$root/src"
  src_desc="git HEAD $(git -C "$SRC" rev-parse --short HEAD)"
elif git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked and untracked-but-not-ignored files that exist (not .venv, build/, *.so, native/*.c).
  git -C "$SRC" ls-files -z -co --exclude-standard |
    (cd "$SRC" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) |
    tar -C "$SRC" --null -T - -c | tar -x -C "$root/src"
  src_desc="work tree of $(git -C "$SRC" rev-parse --short HEAD)"
else
  tar -C "$SRC" -c --exclude=.git --exclude=.venv --exclude=build --exclude=dist --exclude='*.egg-info' \
    --exclude='*.so' --exclude='native/*.c' --exclude=__pycache__ --exclude='.*_cache' . | tar -x -C "$root/src"
  src_desc="directory copy"
fi
[ -f "$root/src/pyproject.toml" ] || die "no pyproject.toml in the copied sources"
find "$root/src/proxy" -name '*.so' -delete
# The venv the wheel is built with and installed into. pip is unpacked into it from the
# rootfs's pip wheel and byte-compiled on the host (ensurepip under qemu takes ~1 min).
in_chroot 120 "/usr/bin/python$pyver" -m venv --without-pip /opt/meshproxy || die "python3 -m venv failed"
site="/opt/meshproxy/lib/python$pyver/site-packages"
python3 -m zipfile -e "$pip_whl" "$root$site" || die "cannot unpack $pip_whl"
host_compile "$root" "$site/pip"
took "$src_desc, $(find "$root/src" -type f | wc -l) files; $(basename "$pip_whl")"

# ------------------------------------------------------------------ 3. wheelhouse
step "host: download build requirements and dependencies as cp${pyver/./} aarch64 wheels"
wheelhouse_ok=0
platforms=()
glibc=$(in_chroot 60 /usr/bin/python3 -c 'import platform; print(platform.libc_ver()[1])') || glibc=""
if [[ "$glibc" =~ ^2\.([0-9]+)$ ]] && mapfile -t reqs < <(python3 "$CHECK" reqs "$SRC/pyproject.toml") && ((${#reqs[@]})); then
  platforms=(--platform manylinux2014_aarch64)
  for ((m = 17; m <= BASH_REMATCH[1]; m++)); do platforms+=(--platform "manylinux_2_${m}_aarch64"); done
  if timeout 300 "${host_env[@]}" python3 "$pip_whl/pip" download --dest "$WHEELHOUSE" --only-binary=:all: \
    --implementation cp --python-version "$pyver" --abi "cp${pyver/./}" "${platforms[@]}" "${reqs[@]}" \
    >"$LOGS/download.log" 2>&1; then
    wheelhouse_ok=1
    took "${#reqs[@]} requirements, glibc $glibc; $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels in $WHEELHOUSE"
  else
    tail -n 5 "$LOGS/download.log" | sed 's/^/   /'
    took "download failed: pip in the chroot will use the index itself (slower)"
  fi
else
  took "skipped (glibc '$glibc', or no requirements from pyproject.toml): pip in the chroot uses the index"
fi
# pip_offline LOG SECONDS ARGS...: pip in the chroot (with the variables of pip_extra_env),
# from the wheelhouse only; if that fails, with the index too.
pip_extra_env=()
pip_offline() {
  local log=$1 secs=$2
  shift 2
  if [ "$wheelhouse_ok" = 1 ]; then
    in_chroot "$secs" "${pip_extra_env[@]}" /opt/meshproxy/bin/python -m pip "$@" --no-index --find-links /wheels \
      >"$log" 2>&1 && return 0
    echo "   (offline pip failed, retrying with the index: $(grep -m1 -E '^ERROR' "$log" || tail -n1 "$log"))"
    mv "$log" "$log.offline"
  fi
  in_chroot "$secs" "${pip_extra_env[@]}" /opt/meshproxy/bin/python -m pip "$@" --find-links /wheels >"$log" 2>&1
}

# ------------------------------------------------------------------ 4. the wheel
# The build requirements (setuptools, Cython...) are unpacked by the host's pip into
# /opt/build-deps for the chroot's tags and byte-compiled natively: installing them into
# pip's isolated build environment under qemu takes ~20 s more. If that fails, pip
# builds with its own isolated environment. setup.py's extensions compile in parallel
# (DIST_EXTRA_CONFIG: [build_ext] parallel), one gcc per host CPU, and without debug
# information: -g0 after Python's own flags (-g ... -fwrapv -O2 ...) in CPPFLAGS, which
# setuptools appends (CFLAGS would replace them): the same code, ~20% less gcc time
# under qemu, a smaller wheel. ARM64_CFLAGS= keeps Python's flags as they are.
step "pip wheel --no-deps in the chroot (Cython + gcc, natively for aarch64 under qemu)"
printf '[build_ext]\nparallel = %s\n' "$(nproc)" >"$root/run/meshproxy-build.cfg"
build_how="isolated build environment"
if [ "$wheelhouse_ok" = 1 ] && mapfile -t breqs < <(python3 "$CHECK" reqs "$SRC/pyproject.toml" build) && ((${#breqs[@]})) &&
  timeout 300 "${host_env[@]}" python3 "$pip_whl/pip" install --target "$root/opt/build-deps" --no-index \
    --find-links "$WHEELHOUSE" --only-binary=:all: --implementation cp --python-version "$pyver" \
    --abi "cp${pyver/./}" "${platforms[@]}" "${breqs[@]}" >"$LOGS/build-deps.log" 2>&1; then
  host_compile "$root" /opt/build-deps
  pip_extra_env=(DIST_EXTRA_CONFIG=/run/meshproxy-build.cfg "CPPFLAGS=$CFLAGS_EXTRA" PYTHONPATH=/opt/build-deps)
  if in_chroot "$T_BUILD" "${pip_extra_env[@]}" /opt/meshproxy/bin/python -m pip wheel -v --no-build-isolation \
    --no-deps --no-index --wheel-dir /out /src >"$LOGS/build.log" 2>&1; then
    build_how="build requirements unpacked by the host: ${breqs[*]}"
  else
    echo "   (build with the host-unpacked requirements failed: $(tail -n1 "$LOGS/build.log"); trying pip's isolated build)"
    mv "$LOGS/build.log" "$LOGS/build.log.no-isolation"
    rm -rf "$root/src/build" "$root"/out/*
  fi
fi
if [ "$build_how" = "isolated build environment" ]; then
  pip_extra_env=(DIST_EXTRA_CONFIG=/run/meshproxy-build.cfg "CPPFLAGS=$CFLAGS_EXTRA")
  pip_offline "$LOGS/build.log" "$T_BUILD" wheel -v --no-deps --wheel-dir /out /src ||
    { tail -n 30 "$LOGS/build.log" >&2; die "pip wheel failed (log: $LOGS/build.log)"; }
fi
pip_extra_env=()
wheels=("$root"/out/meshproxy-*.whl)
[ -f "${wheels[0]}" ] || { tail -n 30 "$LOGS/build.log" >&2; die "pip wheel produced no meshproxy wheel"; }
((${#wheels[@]} == 1)) || die "several wheels in /out: ${wheels[*]}"
wheel_name=$(basename "${wheels[0]}")
grep "warning: .*not built" "$LOGS/build.log" >&2 || true  # setup.py's optional extensions
took "$wheel_name ($(du -k "${wheels[0]}" | cut -f1) KiB; $build_how; extra compiler flags: ${CFLAGS_EXTRA:-none})"

step "host: wheel tag and ELF machine of proxy/_native/relay*.so"
python3 "$CHECK" wheel "${wheels[0]}" || die "wheel check failed (build log: $LOGS/build.log)"
cp "${wheels[0]}" "$CACHE_DIR/out/"
took "copied to $CACHE_DIR/out/"

# ------------------------------------------------------------------ 5. install and run
step "install the wheel and its dependencies into the venv (binary wheels only)"
pip_offline "$LOGS/install.log" "$T_INSTALL" install --only-binary=:all: "/out/$wheel_name" ||
  { tail -n 30 "$LOGS/install.log" >&2; die "pip install of the wheel failed (log: $LOGS/install.log)"; }
took "$(grep -E '^Successfully installed' "$LOGS/install.log" | cut -c1-160)..."

step "import under qemu: aarch64, compiled relay"
in_chroot 120 /opt/meshproxy/bin/python -c 'import platform, proxy.transport.relay as r, proxy._native.relay as n; assert platform.machine()=="aarch64"; assert r.IMPLEMENTATION=="cython"; print(platform.machine(), r.IMPLEMENTATION, n.__file__)' ||
  die "the installed wheel does not import as aarch64 + cython"
took

step "smoke: python -m proxy run: /ready, relay to an echo server, SIGTERM"
in_chroot "$T_SMOKE" /opt/meshproxy/bin/python /run/arm64-wheel-check.py smoke || die "smoke test failed"
took

passed=1
