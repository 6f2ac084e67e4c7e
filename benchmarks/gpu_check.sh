#!/usr/bin/env bash
# The one call to make on a GPU machine (issue 15): the CUDA tests, the training benchmark on "bench"
# (eager, compiled, FP8) and the decode benchmark on "bench" (batch 1 and 32, MTP speculation too),
# each against transformers on the same weights; JSON and logs under OUT_DIR, the summary table last.
# About 8 minutes on one H100; every part has its own time limit, so a hang costs that part only.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu_check.sh OUT_DIR --smoke    # seconds-scale run of the same parts on the CPU (CI)
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--smoke]}
MODE=${2:-full}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "$MODE" = "--smoke" ]; then
    TESTS=(tests/test_cuda.py)   # skipped on the CPU: checks the wiring only
    # float32: nanoseek's first loss equals transformers' to 1e-4 on any CPU (auto is bf16 on AVX512-BF16 CPUs)
    TRAIN=(--preset tiny --steps 2 --warmup 1 --device cpu --peak-size 256 --precision float32
           --impls nanoseek,nanoseek-fp8,nanoseek-muon,transformers)
    DECODE=(--preset tiny --steps 1 --warmup 1 --device cpu --mtp --batch-sizes 1,2 --impls nanoseek,nanoseek-mtp,transformers)
    LIMITS=(120 240 240)
else
    TESTS=(tests/test_cuda.py tests/test_engine.py tests/test_model.py tests/test_fp8_training.py)
    TRAIN=(--preset bench --batch-size 8 --seq-len 2048 --steps 8 --warmup 3 --fp8
           --impls nanoseek,nanoseek-compiled,nanoseek-fp8,nanoseek-muon,transformers)
    DECODE=(--preset bench --prompt-len 128 --new-tokens 128 --batch-sizes 1,32 --mtp --steps 3 --warmup 2)
    LIMITS=(120 200 200)
fi

status() { echo "{\"part\": \"$1\", \"exit_code\": $2, \"seconds\": $3}" > "$OUT/$1.status.json"; }
part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, log to OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    status "$name" "$rc" $((SECONDS - t0))
    tail -n 3 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/env.txt" 2>/dev/null || true
part tests "${LIMITS[0]}" "$PY" -m pytest -q -x "${TESTS[@]}" --junitxml "$OUT/tests.xml"
part train "${LIMITS[1]}" "$PY" benchmarks/train_throughput.py "${TRAIN[@]}" --json "$OUT/train.json"
part decode "${LIMITS[2]}" "$PY" benchmarks/decode.py "${DECODE[@]}" --json "$OUT/decode.json"
"$PY" benchmarks/summary.py "$OUT"
