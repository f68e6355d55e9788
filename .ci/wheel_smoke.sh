#!/usr/bin/env bash
# Wheel smoke test: build the wheel, install it into a fresh venv (no system site packages, no checkout on
# sys.path), start `muse serve` from a folder outside the checkout and check /readyz, /, the page's static
# assets and one POST /api/generate (.ci/wheel_smoke.py). Non-zero exit with a message on any failure.
#
#   bash .ci/wheel_smoke.sh          # PYTHON=python3 by default: the interpreter the venv is made from
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH PYTHONHOME
# Called from .ci/run, the CI venv is active: nothing of it may reach the smoke test.
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PATH=$(printf '%s' "$PATH" | tr ':' '\n' | { grep -vxF "$VIRTUAL_ENV/bin" || true; } | paste -sd: -)
    unset VIRTUAL_ENV
fi

say() { printf '[wheel-smoke] %s\n' "$*"; }
# pip here prints one harmless "Location ... is ignored" warning per package; the exit status stays pip's.
pipq() {
    local py=$1
    shift
    "$py" -m pip "$@" 2>&1 | { grep -v -E "^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.$" || true; }
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/muse-wheel-smoke.XXXXXX")
case "$WORK/" in "$ROOT"/*) say "FAILED: the temp folder $WORK is inside the checkout"; exit 1 ;; esac
PIDFILE="$WORK/server.pid"
cleanup() {
    local rc=$?
    # wheel_smoke.py stops the server itself; this catches a smoke script that was killed.
    if [[ -s "$PIDFILE" ]]; then
        local pid
        pid=$(cat "$PIDFILE")
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    if [[ $rc -ne 0 ]]; then
        say "FAILED (exit $rc)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

VENV="$WORK/venv"
VPY="$VENV/bin/python"
say "fresh venv (no system site packages) from $PYTHON: $VENV"
"$PYTHON" -m venv "$VENV"
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
if ! grep -qx 'include-system-site-packages = false' "$VENV/pyvenv.cfg"; then
    say "FAILED: $VENV sees the system site packages"
    exit 1
fi

# Build from a clean copy of the tracked (and untracked, not ignored) files: a stale build/ or *.egg-info in
# a developer's checkout must not leak into the wheel.
SRC="$WORK/src"
mkdir -p "$SRC"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do if [[ -e "$f" || -L "$f" ]]; then printf '%s\0' "$f"; fi; done \
        | tar --null -T - -cf -) | tar -xf - -C "$SRC"
else
    tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude='*.egg-info' --exclude=./.ci-venv -cf - . | tar -xf - -C "$SRC"
fi

say "pip wheel --no-deps ."
pipq "$VPY" wheel -q --no-deps "$SRC" -w "$WORK/dist"
WHEEL=$(find "$WORK/dist" -maxdepth 1 -name 'muse-*.whl' -print -quit)
if [[ -z "$WHEEL" ]]; then
    say "FAILED: no muse-*.whl in $WORK/dist"
    exit 1
fi
say "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"

say "install torch==2.13.0 (the local CPU wheel), then the wheel with its dependencies"
pipq "$VPY" install -q torch==2.13.0
pipq "$VPY" install -q "$WHEEL"

RUN="$WORK/run"
mkdir -p "$RUN"
# The import must come from the venv's site-packages, never from the checkout.
MUSE_FILE=$(cd "$RUN" && "$VPY" -c 'import muse; print(muse.__file__)')
case "$MUSE_FILE" in
    "$VENV"/*) say "muse imports from $MUSE_FILE" ;;
    *) say "FAILED: muse imports from $MUSE_FILE, not from the venv $VENV"; exit 1 ;;
esac

"$VPY" "$ROOT/.ci/wheel_smoke.py" \
    --muse "$VENV/bin/muse" --workdir "$RUN" --data-dir "$WORK/data" --pidfile "$PIDFILE" --ready-timeout 180
