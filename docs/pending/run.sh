#!/bin/bash
# The GPU checks still owed (docs/pending/README.md), as device calls of <= BUDGET s each:
#   PART=1 BUDGET=570 bash docs/pending/run.sh   # the DSA backward's tile sweep, entmax vs adasplash at 64K
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
  DSA="python3 experiments/bench_dsa.py --seq_lens 65536 --iters 3"
  step bwdtiles 200 $DSA --parts attention --attention_impls triton --noattention_grad --attention_bwd 32:1,64:1:16:4:1,64:1:16:8:1,32:1:16:4:1,32:1:64:4:1,64:1:32:8:1 --out /tmp/be/bwdtiles.json
  step entmax 340 python3 experiments/bench_entmax.py --seq_lens 65536 --iters 2 --check_rows 16 --nobreakdown --inputs topics --out /tmp/be/entmax.json
fi
echo "== end t=$((SECONDS-START))" >> $B
cat /tmp/be/*.json > $OUT/bench.json 2>/dev/null; cat $B
