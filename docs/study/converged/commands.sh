#!/usr/bin/env bash
# The converged-regime study on the CPU (BENCHMARKS.md, "Budgets as in the paper"): WRN-16-2 on a
# fixed 1,000-image Fashion-MNIST subset, E = 100 dense epochs, Delta T = 25 steps (50 topology
# updates in NeuroTrails' 180 epochs of 7 steps), tested on 2,000 images every 5
# epochs, bf16 autocast. The order (fixed before any result of it was seen): every method under the
# paper's budgets (all seeds), then under equal training FLOPs (single = its paper run), then
# NeuroTrails with --head-lr-scale 3, the blocks-in-head and sparsity sweeps at seed 0, the fp32
# check, NeuroTrails at equal epochs, and the sweeps' other seeds. A sweep point identical to a paper
# run (|F_h| = 4, S = 0.8) is that run, copied. Resumable: the same command continues it, and
# several copies of it (one per core, OMP_NUM_THREADS=1) share the grids.
#   bash docs/study/converged/commands.sh OUT DATA_DIR "0 1 2"
set -u
OUT=${1:-runs/converged}
DATA=${2:-data}
SEEDS=${3:-0 1 2}
BASE=(--dataset fashion-mnist --data-dir "$DATA" --model wrn16-2 --train-subset 1000 --test-subset 2000
      --epochs 100 --eval-every 5 --delta-t 25 --bf16 --device cpu)
reuse() {  # reuse SRC DST: a finished run that is also a sweep's point (same config) is not run twice
  if [ -f "$1/results.json" ] && [ ! -e "$2" ]; then mkdir -p "$(dirname "$2")" && cp -r "$1" "$2"; fi
}
sweeps() {  # the blocks-in-head sweep (Fig. 6's Goldilocks question) and the sparsity sweep (Fig. 7)
  reuse "$OUT/paper/method=neurotrails_seed=$1" "$OUT/blocks/blocks-in-head=4_seed=$1"
  python train_vision.py "${BASE[@]}" --budget paper --method neurotrails --sweep blocks-in-head=1,2,3,4,5,6 \
    --seeds "$1" --out "$OUT/blocks"
  reuse "$OUT/paper/method=neurotrails_seed=$1" "$OUT/sparsity/sparsity=0.8_seed=$1"
  python train_vision.py "${BASE[@]}" --budget paper --method neurotrails --sweep sparsity=0.5,0.8,0.95 \
    --seeds "$1" --out "$OUT/sparsity"
}
for s in $SEEDS; do
  python train_vision.py "${BASE[@]}" --budget paper --sweep method=single,treenet,ensemble,neurotrails \
    --seeds "$s" --out "$OUT/paper"
done
for s in $SEEDS; do
  python train_vision.py "${BASE[@]}" --budget flops --sweep method=treenet,ensemble,neurotrails --seeds "$s" \
    --out "$OUT/flops"
done
for s in $SEEDS; do
  python train_vision.py "${BASE[@]}" --budget paper --method neurotrails --head-lr-scale 3 --seeds "$s" \
    --out "$OUT/paper-headlr3"
done
for s in $SEEDS; do
  python train_vision.py "${BASE[@]}" --budget flops --method neurotrails --head-lr-scale 3 --seeds "$s" \
    --out "$OUT/flops-headlr3"
done
sweeps 0
# bf16 against fp32 (the pilot's check of the cheaper arithmetic), seed 0
python train_vision.py "${BASE[@]}" --no-bf16 --budget paper --sweep method=single,neurotrails --seeds 0 \
  --out "$OUT/fp32"
for s in $SEEDS; do
  python train_vision.py "${BASE[@]}" --budget equal --sweep head-lr-scale=1,3 --method neurotrails --seeds "$s" \
    --out "$OUT/equal"
done
for s in $SEEDS; do [ "$s" = 0 ] || sweeps "$s"; done
