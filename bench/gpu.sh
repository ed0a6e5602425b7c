#!/usr/bin/env bash
# Every GPU benchmark in one run, JSON into bench/results/gpu_*.json (the machine, date and command in each):
#
#   1. latency.py          predictor: ViT-H + CLIP B/16 (ssp-sam-224, random weights) in bf16, SDPA on and off side
#                          by side: new image + sentence, new sentence on a cached image, batch throughput (images/s)
#   2. server_latency.py   through the HTTP server (gunicorn, one worker): cold and warm at 1024x1024 (PNG) and
#                          4000x3000 (JPEG), stage by stage, SDPA on with torch.compile off and on side by side,
#                          and the first sentence after a prewarm
#   3. memory.py           worker RSS while the embedding cache fills to EMBEDDING_CACHE_MB (features on the host)
#   4. prelabel_throughput.py   ssp-sam prelabel, images/s (skipped when this checkout has no prelabel command)
#
# Each step has its own time limit (the sum is under 8 minutes); a step that fails or runs out of time is reported
# and the others still run. Exit status: the number of failed steps.
#
#   bench/gpu.sh           # on a machine with a CUDA GPU (PYTHON=... to choose the interpreter)
#   bench/gpu.sh --smoke   # tiny models on the CPU, small images: checks this script end to end in a few minutes;
#                          # results go to a temporary folder, not bench/results
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1

if [[ $SMOKE == 1 ]]; then
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/ssp-sam-gpu-smoke.XXXXXX")
  DEVICE=cpu; DTYPE=fp32
  LATENCY_ARGS=(--variants tiny --repeat 2 --batch 4 --size 96x64)
  SERVER_ARGS=(--model tiny --sizes 96x64 320x240 --images 1 --warm 2 --pause 0.1)
  MEMORY_ARGS=(--model tiny --cache-mb 1 --fill 1.5 --size 64x48)
  PRELABEL_ARGS=(--model tiny --tasks 6 --batch-size 2 --size 96x64)
  LIMITS=(300 600 240 240)
else
  OUT=bench/results
  DEVICE=cuda; DTYPE=bf16
  LATENCY_ARGS=(--variants ssp-sam-224 --repeat 5 --batch 16 --size 1024x1024)
  SERVER_ARGS=(--model ssp-sam-224 --sizes 1024x1024 4000x3000 --images 2 --warm 3 --pause 0.3)
  MEMORY_ARGS=(--model ssp-sam-224 --cache-mb 256 --fill 1.5 --size 320x240)
  PRELABEL_ARGS=(--model ssp-sam-224 --tasks 64 --batch-size 16 --size 1024x768)
  LIMITS=(90 250 75 55)
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: torch sees no CUDA device (use --smoke on a CPU)" >&2
    exit 2
  fi
fi
mkdir -p "$OUT"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))'

FAILED=()
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo
  echo "=== $name (at most ${limit} s): $*"
  timeout --kill-after=20 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [[ $rc == 0 ]] || FAILED+=("$name (exit $rc)")
}

START=$SECONDS
step "latency" "${LIMITS[0]}" "$PY" bench/latency.py "${LATENCY_ARGS[@]}" --device "$DEVICE" --dtype "$DTYPE" \
  --sdpa on off --out "$OUT/gpu_latency.json"
step "server latency" "${LIMITS[1]}" "$PY" bench/server_latency.py "${SERVER_ARGS[@]}" --device "$DEVICE" \
  --dtype "$DTYPE" --prewarm --variants "sdpa=SDPA=true" "compiled=SDPA=true,TORCH_COMPILE=true" \
  --out "$OUT/gpu_server_latency.json"
step "memory" "${LIMITS[2]}" "$PY" bench/memory.py "${MEMORY_ARGS[@]}" --device "$DEVICE" --dtype "$DTYPE" \
  --out "$OUT/gpu_memory.json"
step "prelabel throughput" "${LIMITS[3]}" "$PY" bench/prelabel_throughput.py "${PRELABEL_ARGS[@]}" \
  --device "$DEVICE" --dtype "$DTYPE" --out "$OUT/gpu_prelabel.json"

echo
echo "bench/gpu.sh: $((SECONDS - START)) s in all; results in $OUT:"
ls -1 "$OUT"/gpu_*.json 2>/dev/null
if ((${#FAILED[@]})); then
  printf 'failed: %s\n' "${FAILED[@]}"
fi
exit ${#FAILED[@]}
