#!/usr/bin/env bash
# Create (or update) the repo-local Python venv used by the reference tooling:
#   .venv/ at the repository root, with the pins in scripts/requirements.txt.
# Idempotent: a stamp file records the installed requirement list (and the
# interpreter); pip only runs again when that changes.
#
# `setup-python.sh export` makes .venv-export/ instead, with scripts/requirements-export.txt
# (torch + transformers for scripts/export_minilm_pytorch.py).
#
# Env: PYTHON (interpreter to build the venv from, default python3),
#      SLIMNN_VENV (venv location, default <repo>/.venv or <repo>/.venv-export).
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/.." && pwd)"
if [ "${1:-}" = export ]; then
    venv="${SLIMNN_VENV:-$repo_root/.venv-export}"
    req="$script_dir/requirements-export.txt"
    check='import torch, transformers, onnx; print("setup-python: torch", torch.__version__, "transformers", transformers.__version__)'
else
    venv="${SLIMNN_VENV:-$repo_root/.venv}"
    req="$script_dir/requirements.txt"
    check='import numpy, onnx, onnxruntime; print("setup-python: numpy", numpy.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__)'
fi
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
"$venv/bin/python" -c "$check" || die "the venv at $venv was installed but its imports fail"
printf '%s\n' "$want" > "$stamp"
