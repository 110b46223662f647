#!/bin/bash
# The GPU checks still owed (docs/pending/README.md), as device calls of <= BUDGET s each:
#   PART=1 BUDGET=570 bash docs/pending/run.sh   # relaxed-atomics tests and DSA backward (A/B against acq_rel), the indexer's explicit-positions widths
#   PART=2 BUDGET=570 bash docs/pending/run.sh   # the DSA layer's ops forward / f+b vs cuDNN MLA-192, entmax vs adasplash at 64K
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
  TT=${T_TESTS:-100}
  bg sparse $TT $PT tests/test_token_sparse_kernels.py tests/test_mla_prefill_mosaic_gpu.py
  bg indexer $TT $PT tests/test_indexer_kernels.py tests/test_dsa.py
  for p in "${pids[@]}"; do wait $p; done
  echo "tests done t=$((SECONDS-START))"
  for f in /tmp/be/pt_*.txt; do echo "--- $f"; F $f | grep -v "^\s*$" | tail -8 | cut -c1-700; done
  DSA="python3 experiments/bench_dsa.py --seq_lens 65536 --iters 3"
  step relaxed 150 $DSA --parts attention --attention_impls mosaic_gpu --noattention_grad --attention_bwd 32:0,64:1,32:1 --out /tmp/be/relaxed.json
  step slc 130 python3 experiments/bench_nsa.py --seq_lens 16384,65536 --modes token --slc_impls triton,mosaic_gpu,mosaic_gpu_split --slc_only --decode_batch 0 --iters 3 --out /tmp/be/slc.json
  step idx512 60 $DSA --parts indexer --query_chunk 512 --layer_positions --noscores_only --out /tmp/be/idx512.json
  # the same backward with Pallas' acquire-release atomic_add (this copy of the tree only), for the A/B
  sed -i 's/    relaxed_add(ref, (r, c), val, mask=mask)/    plgpu.atomic_add(ref, (r, c), val, mask=mask)/' pallas_kernels/token_sparse/triton_vjp.py
  step acqrel 70 $DSA --parts attention --attention_impls mosaic_gpu --noattention_grad --attention_bwd 32:0 --out /tmp/be/acqrel.json
  sed -i 's/    plgpu.atomic_add(ref, (r, c), val, mask=mask)/    relaxed_add(ref, (r, c), val, mask=mask)/' pallas_kernels/token_sparse/triton_vjp.py
else
  step layer 200 python3 experiments/bench_dsa.py --seq_lens 65536 --iters 3 --parts forward --query_chunk 512 --out /tmp/be/forward.json
  step entmax 300 python3 experiments/bench_entmax.py --seq_lens 65536 --iters 3 --check_rows 16 --nobreakdown --inputs topics --out /tmp/be/entmax.json
fi
echo "== end t=$((SECONDS-START))" >> $B
cat /tmp/be/*.json > $OUT/bench.json 2>/dev/null; cat $B
