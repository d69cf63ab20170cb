#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian/Ubuntu machine, run as root:
# BCC from the distribution, kernel headers (with a nearest-headers fallback),
# tracefs, a venv that sees the system `bcc`, the project itself, and the
# generated protobuf code. Safe to run again: every step checks before it acts.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STRATOSCOPE_VENV:-$ROOT/.venv}"
KREL="$(uname -r)"
log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }
warn() { printf '\033[1;33m[setup] WARNING:\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[setup] ERROR:\033[0m %s\n' "$*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "run as root (BCC needs it to install packages and load programs): sudo $0"

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update_once() { [ "$APT_UPDATED" = 1 ] || { apt-get update -qq; APT_UPDATED=1; }; }
need_pkgs=()
for p in python3-bpfcc bpfcc-tools python3-venv python3-dev gcc make default-jdk-headless maven chromium e2fsprogs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  apt_update_once
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# --- kernel headers ---------------------------------------------------------
if [ ! -e "/lib/modules/$KREL/build/include/linux/kconfig.h" ] && [ ! -e "/lib/modules/$KREL/build/include/generated/autoconf.h" ]; then
  apt_update_once
  if apt-get install -y -qq "linux-headers-$KREL" >/dev/null 2>&1; then
    log "installed linux-headers-$KREL"
  else
    arch="$(dpkg --print-architecture)"
    apt-get install -y -qq "linux-headers-$arch" >/dev/null || die "no kernel headers for $KREL and linux-headers-$arch failed to install"
    hdr="$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n1)"
    common="${hdr%-"$arch"}-common"
    [ -d "$hdr" ] && [ -d "$common" ] || die "fallback headers not found under /usr/src"
    warn "no headers package for kernel $KREL; falling back to $(basename "$hdr")."
    warn "Stratoscope's programs read only tracepoint arguments and helper values, so older headers are safe for them."
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$hdr" "/lib/modules/$KREL/build"
    ln -sfn "$common" "/lib/modules/$KREL/source"
  fi
fi

build_target="$(readlink -f "/lib/modules/$KREL/build" || true)"
case "$build_target" in
  *"$KREL"*) ;;
  *) warn "kernel $KREL is using fallback headers from $build_target (no exact headers package)." ;;
esac

# --- tracefs ------------------------------------------------------------------
if [ ! -d /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing || die "could not mount tracefs at /sys/kernel/tracing"
  log "mounted tracefs"
fi

# --- venv ---------------------------------------------------------------------
# Debian's python3-bpfcc is built for the system interpreter, so the venv uses it
# and sees its site-packages (that is where `bcc` lives).
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv at $VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.stratoscope-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  log "installing stratoscope and its dev dependencies into the venv"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  touch "$stamp"
fi

# --- generated wire code -----------------------------------------------------
"$VENV/bin/python" "$ROOT/proto/generate.py"

"$VENV/bin/python" -c 'import bcc' || die "the venv cannot import bcc (python3-bpfcc)"
log "ready: $VENV"
