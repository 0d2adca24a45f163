#!/usr/bin/env bash
# The whole GPU check of llmtier in one run, for a CUDA machine with no network
# (the device tool's H200: Python 3.12, torch cu130, transformers, accelerate,
# safetensors, cupy, nvidia-cufile; no google-crc32c, no kvikio).
#
#   benchmarks/gpu/check.sh --fetch-wheels   # here, with network: wheels into .whl/ (google-crc32c, kvikio-cu13)
#   benchmarks/gpu/check.sh                  # there: carry .whl; writes $OUT/gpu-check.json and gpu-check.md
#   benchmarks/gpu/check.sh --dry-run        # anywhere: the CPU parts (stand-in schedule, summary), no GPU needed
#
# Sections run one after the other, each under its own time limit, so a failure
# or a time-out keeps what came before; the summary says which ran. About 8 minutes
# on the H200 (tests 1.5, io 2, weights 3, kv 1.5).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/check.log"
PY=${PYTHON:-python3}
WORK=${LLMTIER_GPU_WORK:-/tmp/llmtier-gpu-check}
mkdir -p "$WORK"

if [ "${1:-}" = "--fetch-wheels" ]; then
    plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    for w in google-crc32c kvikio-cu13 libkvikio-cu13 "rapids-logger==0.3.*"; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl "$w" || exit 1
    done
    ls -la .whl
    exit 0
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llmtier-site .whl/*.whl \
        >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/llmtier-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$ROOT/src:${PYTHONPATH:-}
# the io_uring extension, in place (the engine falls back to threads if it cannot be built, and says so)
ls src/llmtier/engine/_uring*.so >/dev/null 2>&1 || $PY setup.py -q build_ext --inplace >>"$LOG" 2>&1 || true

section() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "{\"section\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >>"$WORK/sections.jsonl"
    echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}
rm -f "$WORK/sections.jsonl"

section env 60 $PY -c "
import torch, llmtier.engine as e, llmtier.engine.cuda as c
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if not c.cuda_reason() else c.cuda_reason())
print('engines', e.available_engines())
try:
    import kvikio; print('kvikio', kvikio.__version__)
except Exception as x: print('kvikio: no', x)
"
if [ $DRY = 1 ]; then
    section tests 600 $PY -m pytest -q -p no:cacheprovider tests/test_offload_device.py tests/test_engine_cuda.py --junitxml="$WORK/tests.xml"
    section io 300 $PY -c "
import json; from llmtier.bench.io_cuda import run_device_study, format_table
cells, notes = run_device_study('$WORK/io', device='cpu', sizes=(1<<20, 16<<20), rounds=2, volume=64<<20, slot_bytes=8<<20, progress=False)
print(format_table(cells, notes)); json.dump({'cells': [c.record() for c in cells], 'notes': notes, 'stand_in': True}, open('$WORK/io.json', 'w'))"
else
    section tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_offload_device.py tests/test_engine_cuda.py --junitxml="$WORK/tests.xml"
    section io 170 $PY -m llmtier.cli bench io --device cuda --dir "$WORK/io" --sizes 1m,64m,256m,1g --rounds 3 \
        --no-progress --json "$WORK/io.json"
    section weights 240 $PY -m llmtier.cli bench weights --device cuda --dir "$WORK/weights" --rounds 3 --new-tokens 16 \
        --no-progress --json "$WORK/weights.json"
    section kv 150 $PY -m llmtier.cli bench kv --device cuda --dir "$WORK/kv" --rounds 2 --batch 8 --context 4096 \
        --new-tokens 8 --fractions 0.25,0.5 --parts a --no-progress --json "$WORK/kv.json"
fi
$PY benchmarks/gpu/summarize.py "$WORK" "$OUT" 2>&1 | tee -a "$LOG"
