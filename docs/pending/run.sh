#!/bin/bash
# Every owed GPU check of docs/pending/README.md in one device call (<= BUDGET s, default 570): the compiled
# test groups at once (each <= T_TESTS s), then the timed benches alone, most needed first, each cut to what
# the budget leaves. From the repo root on the GPU machine, with `wheels/` (peer wheels) carried:
#   BUDGET=560 bash docs/pending/run.sh     # logs and bench JSON land in $OUT
export PYTHONPATH=. JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
ROOT=$PWD; START=$SECONDS; mkdir -p /tmp/be
left() { echo $(( ${BUDGET:-570} - (SECONDS-START) )); }
F() { grep -v -E "^[WI][0-9]{4}|it/s\]" "$@" | grep -v -i "warning"; }
T1=${T_TESTS:-150}
PT="python3 -m pytest -m gpu -q -rf -p no:cacheprovider"
pids=()
bg() { local name=$1 dir=$2; shift 2; ( cd $dir && timeout -k 3 $T1 "$@" > $OUT/pt_$name.txt 2>&1; echo "rc=$?" >> $OUT/pt_$name.txt ) & pids+=($!); }
bg flash $ROOT $PT tests/test_flash_mosaic_gpu.py -k "fused or gradients or compressed_keys or sinks"
bg slcquest $ROOT $PT tests/test_token_sparse_mosaic_gpu.py tests/test_quest.py
bg mla $ROOT $PT tests/test_mla_decode_kernels.py -k "mosaic_gpu_compiled"
bg idxsel $ROOT $PT -s -x tests/test_indexer_fused.py
bg mlaprefill $ROOT $PT tests/test_mla_prefill_mosaic_gpu.py -k bf16 -x
bg nsadec $ROOT $PT -x tests/test_nsa_decode_kernel.py -k "compiled_on_gpu and one_launch"
bg cmpimp $ROOT $PT -x tests/test_flash_pooled_mosaic_gpu.py
for p in "${pids[@]}"; do wait $p; done
echo "tests done t=$((SECONDS-START))"
for f in $OUT/pt_*.txt; do echo "--- $f"; F $f | tail -10; done
B=$OUT/bench.log
step() { # step NAME DIR MAXT CMD...
  local name=$1 dir=$2 maxt=$3; shift 3; local T=$(left); [ $T -gt $maxt ] && T=$maxt
  echo "== $name t=$((SECONDS-START)) T=$T" >> $B
  [ $T -gt 20 ] && [ -d $dir ] && ( cd $dir && timeout -k 3 $T "$@" > $OUT/b_$name.txt 2>&1 ); F $OUT/b_$name.txt | tail -${TAILN:-14} | cut -c1-1500 >> $B; }
step fa3_64 $ROOT 62 python3 experiments/bench_kernels.py --mosaic_gpu --mosaic_bwd split,fused,fused_rows,fused_2r --mosaic_peers= --heads 64:4 --seq_lens 65536 --iters 5 --out /tmp/be/fa3_64.json
step mla $ROOT 63 python3 experiments/bench_dsa.py --parts decode --mla_impls triton,mosaic_gpu --nodecode_sweep --iters 5 --reps 5 --out /tmp/be/mla.json
step idxsel $ROOT 55 python3 experiments/bench_dsa.py --parts=indexer --seq_lens=65536 --iters=3 --query_chunk=16384 --fused --noscores_only --out /tmp/be/idxsel.json
step mlaprefill $ROOT 50 python3 experiments/bench_dsa.py --parts attention --seq_lens 16384,65536 --attention_impls triton,mosaic_gpu --noattention_grad --iters 3 --out /tmp/be/dsa_attention.json
step nsadec $ROOT 58 python3 experiments/bench_nsa.py --decode_one_launch 16,1 --decode_plans split,one_launch --iters 5 --decode_reps 4 --out /tmp/be/nsa_dec.json
step cmpimp $ROOT 55 python3 experiments/bench_nsa.py --cmp_select --seq_lens 16384,65536 --iters 3 --decode_batch 0 --nobackward --out /tmp/be/cmpimp.json
step nsaslc $ROOT 72 python3 experiments/bench_nsa.py --slc_only --slc_impls triton,mosaic_gpu,mosaic_gpu_split --seq_lens 65536,16384 --iters 5 --decode_batch 0 --out /tmp/be/nsaslc.json
step quest $ROOT 88 python3 experiments/bench_training_free.py --noprefill --batches 16,1 --quest_pages 16 --quest_bounds bfloat16 --quest_hlo --reps 5 --iters 5 --quest_score_forms reduce,triton:64:4:dot --quest_topk xla,radix,radix:2:6:2048:8,histogram:4,approx:0.95,chunked:1024 --out /tmp/be/quest.json
step nsa64 $ROOT 110 python3 experiments/bench_nsa.py --seq_lens 65536 --modes token --iters 3 --decode_batch 0 --check_rows 8 --cmp_triton --out /tmp/be/bench_nsa.json
step fa3_16 $ROOT 40 python3 experiments/bench_kernels.py --mosaic_gpu --mosaic_bwd split,fused,fused_2r --mosaic_peers= --heads 16:16 --seq_lens 16384,65536 --iters 5 --out /tmp/be/fa3_16.json
echo "== end t=$((SECONDS-START))" >> $B
cp /tmp/be/*.json $OUT/ 2>/dev/null; cat $B
