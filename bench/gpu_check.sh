#!/usr/bin/env bash
# Everything the README reports for one GPU, in one go: ceilings, the GPU test tier, benchmark
# suites (JSON, CSV, PNG plots) and the perf gate. Usage, from the repository root:
#   bash bench/gpu_check.sh [OUT_DIR] [SUITE ...]        (default: runs/bench/gpu-<UTC time>, all suites)
# PYTHON picks the interpreter (default python3). GATE=update records a new gate baseline instead of
# comparing, GATE=skip skips it. PACK=FILE.tgz also packs OUT_DIR into one archive.
# Exits non-zero if any step failed; every step still runs and keeps its log in OUT_DIR.
set -u
PY=${PYTHON:-python3}
OUT_DIR=${1:-runs/bench/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
shift || true
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run, log to OUT_DIR/NAME.txt, show the tail
  local name=$1 rc
  shift
  echo "== $name: $*"
  "$@" >"$OUT_DIR/$name.txt" 2>&1
  rc=$?
  tail -n "${TAIL:-30}" "$OUT_DIR/$name.txt"
  if [ "$rc" -ne 0 ]; then echo "!! $name failed (exit $rc)"; status=1; fi
}

step env "$PY" -m bench env --measure-ceilings
step gpu-tests "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT_DIR/gpu-tests.xml"
TAIL=80 step run "$PY" -m bench run "$@" --out "$OUT_DIR/run"
step plot "$PY" -m bench plot "$OUT_DIR/run/results.json" --out "$OUT_DIR/plots"
case "${GATE:-compare}" in
  update) step gate "$PY" -m bench gate --update ;;
  skip) ;;
  *) step gate "$PY" -m bench gate ;;
esac
if [ -n "${PACK:-}" ]; then tar czf "$PACK" -C "$OUT_DIR" .; fi
exit "$status"
