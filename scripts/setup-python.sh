#!/usr/bin/env bash
# Create (or update) the repo-local Python venv used by the reference tooling:
#   .venv/ at the repository root, with the pins in scripts/requirements.txt.
# Idempotent: a stamp file records the installed requirement list (and the
# interpreter); pip only runs again when that changes.
#
# Env: PYTHON (interpreter to build the venv from, default python3),
#      SLIMNN_VENV (venv location, default <repo>/.venv).
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/.." && pwd)"
venv="${SLIMNN_VENV:-$repo_root/.venv}"
req="$script_dir/requirements.txt"
python="${PYTHON:-python3}"
stamp="$venv/.slimnn-requirements.stamp"

die() { echo "setup-python: $*" >&2; exit 1; }

command -v "$python" >/dev/null 2>&1 || die "no Python interpreter '$python' found (set PYTHON=...)"
[ -f "$req" ] || die "missing $req"

py_version="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
want="$(printf 'python %s\n' "$py_version"; grep -v '^[[:space:]]*\(#\|$\)' "$req")"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup-python: $venv is up to date"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "setup-python: creating $venv (Python $py_version)"
    "$python" -m venv "$venv" || die "could not create a venv at $venv"
fi

rm -f "$stamp"
echo "setup-python: installing $(grep -v '^[[:space:]]*\(#\|$\)' "$req" | paste -sd' ')"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: -r "$req" \
    || die "pip install from PyPI failed for $(basename "$req") (is PyPI reachable?)"
# Fail loudly if an import is broken rather than stamping a bad venv.
"$venv/bin/python" -c 'import numpy, onnx, onnxruntime; print("setup-python: numpy", numpy.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__)' \
    || die "the venv at $venv was installed but cannot import numpy/onnx/onnxruntime"
printf '%s\n' "$want" > "$stamp"
