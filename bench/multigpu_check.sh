#!/usr/bin/env bash
# Everything the README's "Several GPUs" section reports, in one call of 8-9.5 minutes on a machine with
# 2+ GPUs: the multi-GPU test tier, `python -m bench dist --quick`, and, if time is left, a short train.py
# run at the record config on every GPU. Usage, from the repository root:
#   bash bench/multigpu_check.sh DEST                 (on the device machine: DEST=$OUT)
# DEST receives two files: summary.txt (what this script printed) and multigpu.tgz (every log, the tests'
# JUnit XML and measured errors, bench dist's JSON, PNG and traces, the train.py run's log, metrics and
# report). PYTHON picks the interpreter (default python3). STEPS (default "tests dist record") picks the
# steps. BUDGET_S (default 575) bounds the whole run: the tests get at most TESTS_S (default 270) of it,
# bench dist what is left, and the train.py run (RECORD_STEPS steps, default 30, 3 priming steps per loop
# mode) only if RECORD_MIN_S (default 100) remain. Wheels in .whl/ (brotli: model/quant.py writes
# artifacts with it) are installed into /tmp/site first. Exits non-zero if any step failed.
set -u
PY=${PYTHON:-python3}
DEST=${1:?usage: bash bench/multigpu_check.sh DEST}
BUDGET_S=${BUDGET_S:-575}
STEPS=${STEPS:-tests dist record}
WORK=$(mktemp -d /tmp/multigpu.XXXXXX)
mkdir -p "$DEST"
exec > >(tee "$WORK/console.txt") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (DESIGN.md section 7): a value the machine has is kept, an absent one set.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
export GOLFBENCH_TEST_REPORT="$WORK/multigpu-tests.jsonl"
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

left() { echo $((BUDGET_S - SECONDS)); }
limit() {  # limit RESERVE_S [CAP_S]: what is left of the budget minus RESERVE_S, at most CAP_S, at least 60
  local l=$(($(left) - $1))
  if [ -n "${2:-}" ] && [ "$l" -gt "$2" ]; then l=$2; fi
  if [ "$l" -lt 60 ]; then l=60; fi
  echo "$l"
}
wanted() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to WORK/NAME.txt, show the tail
  local name=$1 limit=$2 rc t0=$SECONDS
  shift 2
  echo "== $name (limit ${limit} s, $(left) s of the budget left): $*"
  timeout --kill-after=60 "$limit" "$@" >"$WORK/$name.txt" 2>&1
  rc=$?
  tail -n "${TAIL:-40}" "$WORK/$name.txt"
  echo "-- $name: exit $rc after $((SECONDS - t0)) s"
  if [ "$rc" -ne 0 ]; then echo "!! $name failed (exit $rc)"; status=1; fi
}

NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "multigpu_check: $NPROC GPU(s), NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE" \
  "TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS=$NVSHMEM_DISABLE_NVLS"
step env 60 sh -c "nvidia-smi -L; nvidia-smi topo -m; $PY -m bench env"
if wanted tests; then
  step tests "$(limit 20 "${TESTS_S:-270}")" "$PY" -m pytest -m multigpu -q -rA -p no:cacheprovider \
    --junitxml="$WORK/tests.xml"
  echo "== measured errors and times of the multi-GPU tests:"
  cut -c1-700 "$GOLFBENCH_TEST_REPORT" 2>/dev/null
fi
if wanted dist; then
  TAIL=30 step dist "$(limit 10)" "$PY" -m bench dist --nproc "$NPROC" --quick --keep-traces --timeout 330 \
    --out "$WORK/dist"
fi
if wanted record && [ "$(left)" -ge "${RECORD_MIN_S:-100}" ]; then
  step record "$(limit 5)" env ITERATIONS="${RECORD_STEPS:-30}" WARMUP_STEPS=3 MAX_WALLCLOCK_SECONDS=0 \
    TRAIN_LOG_EVERY=1 VAL_LOSS_EVERY=0 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    train.py --train-only --out-dir "$WORK/runs" --run-id "record-${NPROC}gpu"
elif wanted record; then
  echo "== record: skipped ($(left) s of the budget left, RECORD_MIN_S=${RECORD_MIN_S:-100})"
fi
echo "multigpu_check: done in $SECONDS s, status $status"
exec >&- 2>&-
wait "$TEE_PID"
cp "$WORK/console.txt" "$DEST/summary.txt"
tar czf "$DEST/multigpu.tgz" -C "$WORK" .
exit "$status"
