#!/bin/bash
# The GPU checks still owed (docs/pending/README.md), as device calls of <= BUDGET s each:
#   PART=1 BUDGET=380 bash docs/pending/run.sh   # entmax Mosaic stats (staged maxima) compiled + timed 16K / 64K, Quest's new defaults
#   PART=2 BUDGET=580 bash docs/pending/run.sh   # entmax vs adasplash at 64K (its autotune alone is minutes)
# From the repo root on the GPU machine, `wheels/` (peer wheels) carried; logs and bench JSON land in $OUT.
export PYTHONPATH=. JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
ROOT=$PWD; START=$SECONDS; mkdir -p /tmp/be
left() { echo $(( ${BUDGET:-560} - (SECONDS-START) )); }
F() { grep -v -E "^[WI][0-9]{4}|it/s\]" "$@" | grep -v -i "warning"; }
PT="python3 -m pytest -m gpu -q -rf -p no:cacheprovider"
pids=()
bg() { local name=$1 t=$2; shift 2; ( timeout -k 3 $t "$@" > /tmp/be/pt_$name.txt 2>&1; echo "rc=$?" >> /tmp/be/pt_$name.txt ) & pids+=($!); }
B=$OUT/bench.log
step() { # step NAME MAXT CMD...
  local name=$1 maxt=$2; shift 2; local T=$(left); [ $T -gt $maxt ] && T=$maxt
  echo "== $name t=$((SECONDS-START)) T=$T" >> $B
  [ $T -gt 20 ] && ( timeout -k 3 $T "$@" > /tmp/be/b_$name.txt 2>&1 ); F /tmp/be/b_$name.txt | tail -${TAILN:-16} | cut -c1-1500 >> $B; }
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -1    # tensorboardX (the scripts' logs), peers
if [ "${PART:-1}" = 1 ]; then   # in order of need: a budget cut keeps the steps before it ($OUT/bench.log grows per step)
  bg entmax 120 $PT tests/test_entmax_kernels.py          # Mosaic GPU stats: staged tile maxima, tmax rows by TMA (6dce6a1, 46ccb0f)
  wait "${pids[@]}"; for f in /tmp/be/pt_*.txt; do echo "== $f" >> $B; F $f | tail -6 >> $B; done
  TAILN=30 step quest 80 python3 experiments/bench_training_free.py --noprefill --batches 16,1 --contexts 131072 --quest_pages 16 --quest_topk auto --out /tmp/be/quest.json
  TAILN=20 step entmax 120 python3 experiments/bench_entmax.py --seq_lens 16384,65536 --inputs topics --noadasplash --iters 3 --check_rows 8 --stats_impl triton --sweep stats_impl=mosaic_gpu --out /tmp/be/entmax.json
  # which PTX ISA XLA gives the Pallas Triton kernels (v4 float atomics from PTX 8.1; experiments/atomics_ptx.py)
  TAILN=6 step atomics 60 env XLA_FLAGS="--xla_dump_to=/tmp/xd" python3 experiments/bench_dsa.py --seq_lens 16384 --iters 1 --parts attention --attention_impls triton --noattention_grad --attention_bwd 32:1
  { echo "== ptx atomics"; ls /tmp/xd 2>/dev/null | wc -l; ls /tmp/xd 2>/dev/null | grep -iE "ptx|triton" | head -5
    grep -rlE "^\.version" /tmp/xd 2>/dev/null | head -3; grep -rhoE "(red|atom)\.global\.[a-z0-9.]+" /tmp/xd 2>/dev/null | sort | uniq -c
    grep -rh "^\.version" /tmp/xd 2>/dev/null | sort | uniq -c; } >> $B
fi
if [ "${PART:-1}" = 2 ]; then   # adasplash's Triton autotune at 64K outlasted a 340 s step twice
  TAILN=10 step adasplash 560 python3 experiments/bench_entmax.py --seq_lens 65536 --iters 2 --check_rows 16 --nobreakdown --inputs topics --out /tmp/be/adasplash.json
fi
echo "== end t=$((SECONDS-START))" >> $B
cat /tmp/be/*.json > $OUT/bench.json 2>/dev/null; cat $B
