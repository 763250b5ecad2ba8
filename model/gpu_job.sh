#!/usr/bin/env bash
# One command for the whole GPU job on a bare, offline machine with torch installed:
#   bash model/gpu_job.sh OUT_DIR [options of python -m mtlsp_model.gpu_job]
# Installs missing pure dependencies from ./wheelhouse when there is one (carry it along),
# and runs the model package from this checkout without installing it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if ! python3 -c 'import tokenizers, safetensors, numpy' 2>/dev/null; then
    pip install --no-index --find-links "$repo/wheelhouse" tokenizers safetensors numpy
fi
shim=$(mktemp -d)
ln -s "$repo/model" "$shim/mtlsp_model"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
out=${1:?usage: bash model/gpu_job.sh OUT_DIR [options]}
mkdir -p "$out"
python3 -m mtlsp_model.gpu_job "$@" 2>&1 | tee "$out/job.log"
