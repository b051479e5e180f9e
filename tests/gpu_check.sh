#!/usr/bin/env bash
# Issue 19's GPU run in one command, for a session lent the device tool (an H100 or H200; 15 minutes of
# device time, its start included, so this stops itself after BUDGET_S = 420 s):
#   1. the official code on CUDA in three regimes (tests/make_gpu_official.py) -> tests/fixtures/gpu/ and $OUT
#   2. bench rows of the full model: one image top-20 in bfloat16 and float32, eager dynamic against
#      captured static, and batch 1/8/32/64 at top-10 -> $OUT/bench.jsonl
#   3. the prefix and one captured step timed and profiled (tests/gpu_profile.py) -> $OUT/profile.txt
#   4. pytest --device cuda over the suite but the lessons (their notebooks run on the CPU and need a
#      Jupyter kernel the machine lacks), in the time left -> $OUT/pytest.txt
# The suite runs last because it is the one step of open length; the log is $OUT/gpu_check.log.
#
# Once, here (the official sources, LLaMA's tokenizer and the wheels the machine lacks, into .gpu_check/,
# which .gitignore keeps out of commits):
#     NXTP_LLAMA_TOKENIZER=PATH/tokenizer.model tests/gpu_check.sh prepare
# Then, with the device tool:
#     run(command="bash tests/gpu_check.sh", carry=[".gpu_check"], timeout_s=480)
# and copy files_at/official.*.safetensors into tests/fixtures/gpu/ to commit them.
# A rehearsal on the CPU (tiny model, one test file, outputs kept out of tests/fixtures/gpu/):
#     DEVICE=cpu PRESET=tiny TESTS=tests/test_gpu_official.py OUT=/tmp/gpu_check PYTHON=.venv/bin/python \
#         tests/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
HERE=.gpu_check
PY=${PYTHON:-python3}

if [ "${1:-}" = prepare ]; then
    set -e
    $PY tests/make_gpu_official.py --export-sources $HERE
    cp "${NXTP_LLAMA_TOKENIZER:?set NXTP_LLAMA_TOKENIZER to the LLaMA tokenizer.model}" $HERE/tokenizer.model
    # the machine's Python 3.12 has everything the suite imports but webdataset (training/data.py)
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d $HERE/wheels webdataset==1.0.2 braceexpand==0.1.7
    du -sh $HERE
    exit
fi

DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-full}
TESTS=${TESTS:-tests}
DEADLINE=$((SECONDS + ${BUDGET_S:-420}))
: "${OUT:?OUT must name the folder for the results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NXTP_LLAMA_TOKENIZER=$PWD/$HERE/tokenizer.model
if [ "$DEVICE" = cuda ]; then
    REFERENCES=tests/fixtures/gpu REGIMES="float32 autocast-bfloat16 official-float16"
else  # CPU outputs never go where the GPU references are read from; official-float16 needs CUDA
    REFERENCES=$OUT/references REGIMES="float32 autocast-bfloat16"
fi

stamp() { echo "== $(date -u +%T) [$SECONDS s] $*"; }

main() {
    stamp "machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
    if ! $PY -c "import webdataset" 2>/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $HERE/wheels/*.whl &&
            export PYTHONPATH=/tmp/site
    fi

    stamp "1. official references: $REGIMES"
    mkdir -p "$REFERENCES"
    # the official loader prints its settings; only the differences from the CPU fixtures are kept
    timeout 150 $PY tests/make_gpu_official.py --official $HERE/nxtp/src --clip $HERE/clip --device "$DEVICE" \
        --regimes $REGIMES --out "$REFERENCES" | grep -E "^(==|   )"
    cp "$REFERENCES"/official.*.safetensors "$OUT"/

    stamp "2. bench"
    bench() {
        timeout 120 $PY -m nxtp_minimal bench --preset "$PRESET" --device "$DEVICE" --steps 3 --no-reference \
            --decode dynamic static --json "$@" | tee -a "$OUT/bench.jsonl"
    }
    bench --dtype bfloat16 --top-k 20 --repeats 20
    bench --dtype float32 --top-k 20 --repeats 20
    bench --dtype bfloat16 --top-k 10 --batch 1 8 32 64 --repeats 5

    stamp "3. profile"
    timeout 120 $PY tests/gpu_profile.py --device "$DEVICE" --preset "$PRESET" > "$OUT/profile.txt" 2>&1
    grep -E "^(full|tiny|small|==|captured)" "$OUT/profile.txt"

    left=$((DEADLINE - SECONDS > 60 ? DEADLINE - SECONDS : 60))
    stamp "4. pytest --device $DEVICE $TESTS, at most $left s"
    options=()
    $PY -c "import xdist" 2>/dev/null && options+=(-n 8 --dist loadfile)  # one file per worker: its models built once
    $PY -c "import pytest_timeout" 2>/dev/null && options+=(--timeout 150)
    # 8 workers share 16 cores: 2 threads each rather than 16
    OMP_NUM_THREADS=2 timeout "$left" $PY -m pytest "$TESTS" --device "$DEVICE" --ignore tests/test_lessons.py -p no:cacheprovider -v \
        --continue-on-collection-errors "${options[@]}" > "$OUT/pytest.txt" 2>&1
    echo "pytest exit status $? (124: stopped at the time limit; the results so far are in pytest.txt)"

    stamp "summary"
    echo "official references (largest differences from the CPU fixtures):"
    grep -E "^== [a-z]|logits|output.tokens|case |train loss|DIFFERENT" "$OUT/gpu_check.log" | head -60
    echo "bench:"
    $PY - "$OUT/bench.jsonl" <<'EOF'
import json
import sys

for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print(f"  {r['dtype']:>8} {r['decode']:>7} batch {r['batch']:>2} top-{r['k']:<2} "
              f"{1e3 * r['fast_s']:8.2f} ms {r['images_per_s']:8.1f} images/s")
EOF
    echo "pytest:"
    grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -20
    tail -n 1 "$OUT/pytest.txt"
}

main 2>&1 | tee "$OUT/gpu_check.log"
