#!/usr/bin/env bash
# Download, here (where the package index is reachable), the wheels a bare CUDA machine lacks for
# `make gpu-check` (bench/gpu_check.py --install-wheels DIR installs them there, offline):
#   diffusers (the version in requirements-lock.txt, else .venv's, else the one below) and the pure-Python packages it needs that a
#   plain torch + transformers image may lack (importlib_metadata, lazy-importer, zipp), and pytest with its own
#   (pytest, pluggy, iniconfig). All are py3-none-any wheels: they fit any CPython >= 3.9 on any platform.
# The GPU machine installs only those its Python lacks or holds in a version that does not satisfy the
# requirement (pip's resolver decides, against its installed packages), into a temporary folder first on the path:
# its own torch, transformers, numpy, Pillow, huggingface_hub and safetensors stay in use.
#
#   tools/gpu_wheels.sh [DIR]        (default .gpu-wheels; ignored by git, so carry it to the device machine)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu-wheels}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

LOCK=${LOCK:-requirements-lock.txt}
# package, and the version to take where neither the lock nor .venv names one
PACKAGES=(
  "diffusers 0.42.1"
  "importlib_metadata 10.2.0"
  "lazy-importer 0.1.0"
  "zipp 4.1.2"
  "pytest 9.2.0"
  "pluggy 1.7.0"
  "iniconfig 2.3.1"
)

specs=()
for entry in "${PACKAGES[@]}"; do
  set -- $entry
  key=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  locked=$([ -f "$LOCK" ] && grep -i "^$key==" "$LOCK" | head -1 | cut -d= -f3 || true)
  installed=$("$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p' || true)
  specs+=("$1==${locked:-${installed:-$2}}")
done

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --implementation py --python-version 3.12 --platform any -d "$DEST" "${specs[@]}"
# The revision these wheels travel with (the device machine's copy of the tree has no .git).
git describe --always --dirty --abbrev=12 > "$DEST/REVISION" 2>/dev/null || echo unknown > "$DEST/REVISION"

echo "wheels in $DEST ($(du -sh "$DEST" | cut -f1)), for revision $(cat "$DEST/REVISION"):"
ls -1 "$DEST"
