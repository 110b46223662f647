#!/bin/bash
# The GPU checks still owed (docs/pending/README.md), as device calls of <= BUDGET s each:
#   PART=1 BUDGET=570 bash docs/pending/run.sh   # entmax Mosaic stats (fixed) compiled + timed, packed top-k
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
if [ "${PART:-1}" = 1 ]; then
  bg entmax 200 $PT tests/test_entmax_kernels.py          # the Mosaic GPU stats after the race fix (2c315b2)
  bg topk 120 $PT tests/test_indexer_select.py            # whole-row top-k, packed counts (21622fc)
  bg pages 150 $PT tests/test_decode_kernels.py -k selected   # several pages per tile (84dd0b8)
  bg idx 180 $PT tests/test_indexer_kernels.py tests/test_indexer_fused.py   # few-row selects now take the whole-row form (c70a1cf)
  wait "${pids[@]}"; for f in /tmp/be/pt_*.txt; do echo "== $f" >> $B; F $f | tail -6 >> $B; done
  TAILN=20 step entmax 160 python3 experiments/bench_entmax.py --seq_lens 16384,65536 --inputs topics --noadasplash --iters 3 --check_rows 8 --stats_impl triton --sweep stats_impl=mosaic_gpu --out /tmp/be/entmax.json
  TAILN=30 step topk 150 python3 experiments/bench_training_free.py --noprefill --batches 1,16 --contexts 131072 --quest_pages 16 --quest_topk auto,whole:1,whole:2,packed:2,packed:2:8,packed:2:16,packed:4 --quest_blocks_per_tile 0,1,2,4,8 --out /tmp/be/topk.json
  # do XLA's Triton kernels get the v4 float atomics? (experiments/atomics_ptx.py: yes at PTX >= 8.1, scalar at 8.0)
  TAILN=6 step atomics 90 env XLA_FLAGS="--xla_dump_to=/tmp/xd --xla_gpu_dump_llvmir" python3 experiments/bench_dsa.py --seq_lens 16384 --iters 1 --parts attention --attention_impls triton --noattention_grad --attention_bwd 32:1
  { echo "== ptx atomics"; grep -rhoE "(red|atom)\.global\.[a-z0-9.]+" /tmp/xd 2>/dev/null | sort | uniq -c; grep -rh "^\.version" /tmp/xd 2>/dev/null | sort | uniq -c; } >> $B
fi
if [ "${PART:-1}" = 2 ]; then   # adasplash's Triton autotune at 64K outlasted a 340 s step twice
  TAILN=10 step adasplash 560 python3 experiments/bench_entmax.py --seq_lens 65536 --iters 2 --check_rows 16 --nobreakdown --inputs topics --out /tmp/be/adasplash.json
fi
echo "== end t=$((SECONDS-START))" >> $B
cat /tmp/be/*.json > $OUT/bench.json 2>/dev/null; cat $B
