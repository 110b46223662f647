#!/usr/bin/env bash
# Every kernel benchmark of BENCHMARKING.md in one run on one GPU (issue 3's table).
# Usage (GPU machine, repo root): OUT=/tmp/bench bash experiments/bench_all.sh
# Writes one log per benchmark and bench_json.tgz (the full JSON) under $OUT.
# PYTHON (default python3) is the interpreter, e.g. PYTHON=.venv/bin/python.
set -u
usage() { sed -n '2,5p' "$0" | cut -c3-; }
case "${1:-}" in
  -h|--help|-help|--helpshort) usage; exit 0 ;;
  "") ;;
  *) echo "bench_all.sh: takes no arguments (got '$1'); settings are the variables OUT and PYTHON" >&2
     usage >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/bench}
mkdir -p "$OUT/json"
PYTHON=${PYTHON:-python3}
export PYTHONPATH=. JAX_PLATFORMS=cuda,cpu PYTHONUNBUFFERED=1
B=experiments/bench_kernels.py
run() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"
}
run flash 230 "$PYTHON" $B --heads 16:16,16:4,64:4 --seq_lens 16384,65536 --iters 10 --out "$OUT/json/flash.json"
run mosaic_gpu 70 "$PYTHON" $B --mosaic_gpu --heads 16:16,64:4 --nobackward --seq_lens 16384,65536 --mosaic_stages 2 --out "$OUT/json/mosaic_gpu.json"
run scores 80 "$PYTHON" $B --scores --heads 16:16 --seq_lens 16384,65536 --score_blocks 64,128 --iters 10 --out "$OUT/json/scores.json"
run block_sparse 110 "$PYTHON" $B --block_sparse --heads 16:16,16:4 --seq_lens 16384,65536 --iters 10 --out "$OUT/json/block_sparse.json"
run decode 75 "$PYTHON" experiments/bench_decode.py --budget_s 45 --out "$OUT/json/decode.json"
run token_sparse 300 "$PYTHON" experiments/bench_token_sparse.py --iters 5 --out "$OUT/json/token_sparse.json"
run training_free 420 "$PYTHON" experiments/bench_training_free.py --reps 5 --out "$OUT/json/training_free.json"
run nsa 420 "$PYTHON" experiments/bench_nsa.py --iters 5 --out "$OUT/json/nsa.json"
run dsa 600 "$PYTHON" experiments/bench_dsa.py --iters 5 --reps 10 --out "$OUT/json/dsa.json"
tar czf "$OUT/bench_json.tgz" -C "$OUT" json && rm -rf "$OUT/json"
