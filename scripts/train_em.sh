#!/usr/bin/env bash
# Start, or resume exactly (from runs/<folder>/last.pt, or the copy a session committed
# under checkpoints/<folder>/), one of issue 15's EM training runs in the background:
# psc-train em under nohup, one thread, output appended to runs/<folder>/train.log, its
# PID in runs/<folder>/pid. The zarr copies of ../shared/data are made first if missing.
#   scripts/train_em.sh lovo-fib25       # FIB-25's two crops only (tested on NeuroProof)
#   scripts/train_em.sh lovo-neuroproof  # NeuroProof only (tested on FIB-25)
#   scripts/train_em.sh shipped          # all three volumes, P2SC2: the default EM model
#   scripts/train_em.sh conv3d           # all three volumes, its conv3d twin
#   scripts/train_em.sh shipped-long     # all three volumes, P2SC2, 10000 iterations (spans sessions)
#   scripts/train_em.sh lovo-fib25-long  # lovo-fib25 at 10000 iterations (spans sessions)
#   scripts/train_em.sh lovo-neuroproof-long  # lovo-neuroproof at 10000 iterations (spans sessions)
#   scripts/train_em.sh conv3d-long      # its conv3d twin at the same 10000 iterations
#   scripts/train_em.sh shipped-long-seed1  # shipped-long again with seed 1: the seed-to-seed spread
#   scripts/train_em.sh shipped-wide     # shipped at 16 feature maps: P2SC2 at conv3d's parameter count
#                                        # (655,775 against 622,545), 2500 iterations like conv3d
#   scripts/train_em.sh lovo-fib25-old-recipe  # lovo-fib25 with the recipe before issue 15
#                                        # (dtype scaling, basic augmentation, no long-range targets)
#   scripts/train_em.sh lovo-fib25-histeq       # lovo-fib25, histogram equalisation for the percentiles
#   scripts/train_em.sh lovo-fib25-basic-aug    # lovo-fib25, basic augmentation only
#   scripts/train_em.sh lovo-fib25-no-long-range  # lovo-fib25, nearest-neighbour targets only
#   scripts/train_em.sh lovo-fib25-lsd          # lovo-fib25 plus local shape descriptors (sigma 5 voxels)
# (histeq to lsd: one recipe choice each against lovo-fib25, measured on NeuroProof)
# Same recipe and budget for every run (docs/results-em.md); ITERATIONS overrides 2500
# only for a new run (the cosine schedule depends on it). THREADS (default 1) sets torch's
# threads, e.g. THREADS=2 when this is the machine's only job.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?run name: lovo-fib25, lovo-neuroproof, shipped or conv3d}
DATA=${PSC_DATA:-../shared/data}
D=runs/data
FIB="$D/fib25.zarr/raw $D/fib25-tiny.zarr/raw"
FIB_L="$D/fib25.zarr/labels $D/fib25-tiny.zarr/labels"
NP="$D/neuroproof.zarr/raw"
NP_L="$D/neuroproof.zarr/labels"
CONV=p2sc2
EXTRA=()
DEFAULT_ITERATIONS=2500
case "$RUN" in
    lovo-fib25) RAW="$FIB"; LABELS="$FIB_L" ;;
    lovo-neuroproof) RAW="$NP"; LABELS="$NP_L" ;;
    shipped) RAW="$FIB $NP"; LABELS="$FIB_L $NP_L" ;;
    conv3d) RAW="$FIB $NP"; LABELS="$FIB_L $NP_L"; CONV=conv3d ;;
    shipped-long) RAW="$FIB $NP"; LABELS="$FIB_L $NP_L"; DEFAULT_ITERATIONS=10000 ;;
    conv3d-long) RAW="$FIB $NP"; LABELS="$FIB_L $NP_L"; CONV=conv3d; DEFAULT_ITERATIONS=10000 ;;
    shipped-long-seed1) RAW="$FIB $NP"; LABELS="$FIB_L $NP_L"; DEFAULT_ITERATIONS=10000; EXTRA=(--seed 1) ;;
    shipped-wide) RAW="$FIB $NP"; LABELS="$FIB_L $NP_L"
        EXTRA=(--options '{"num_fmaps": 16, "fmap_inc_factor": 3, "downsample_factors": [[2, 2, 2], [2, 2, 2]]}') ;;
    lovo-fib25-long) RAW="$FIB"; LABELS="$FIB_L"; DEFAULT_ITERATIONS=10000 ;;
    lovo-neuroproof-long) RAW="$NP"; LABELS="$NP_L"; DEFAULT_ITERATIONS=10000 ;;
    lovo-fib25-old-recipe) RAW="$FIB"; LABELS="$FIB_L"
        EXTRA=(--augmentation basic --long-range --normalisation divide-by-dtype-max) ;;
    lovo-fib25-histeq) RAW="$FIB"; LABELS="$FIB_L"; EXTRA=(--normalisation histogram-equalisation) ;;
    lovo-fib25-basic-aug) RAW="$FIB"; LABELS="$FIB_L"; EXTRA=(--augmentation basic) ;;
    lovo-fib25-no-long-range) RAW="$FIB"; LABELS="$FIB_L"; EXTRA=(--long-range) ;;
    lovo-fib25-lsd) RAW="$FIB"; LABELS="$FIB_L"; EXTRA=(--lsd-sigma 5) ;;
    *) echo "error: unknown run '$RUN' (lovo-fib25, lovo-neuroproof, shipped, conv3d, shipped-long, conv3d-long, shipped-long-seed1, shipped-wide, lovo-fib25-long, lovo-neuroproof-long," \
            "lovo-fib25-old-recipe, lovo-fib25-histeq, lovo-fib25-basic-aug, lovo-fib25-no-long-range, lovo-fib25-lsd)" >&2; exit 2 ;;
esac
FOLDER=em-$RUN
OUT=runs/$FOLDER
KEPT=checkpoints/$FOLDER
convert() {  # source dataset, container, array, voxel size
    [ -d "$2/$3" ] || .venv/bin/psc-convert "$1" "$2" --voxel-size $4 $4 $4 >/dev/null
}
mkdir -p "$D" "$OUT" runs/weights
convert "$DATA/fib25/train-image.h5:/stack" $D/fib25.zarr raw 8
convert "$DATA/fib25/train-gt.lzf.h5:/stack" $D/fib25.zarr labels 8
convert "$DATA/fib25/tiny_fib_example.h5:/raw" $D/fib25-tiny.zarr raw 8
convert "$DATA/fib25/tiny_fib_example.h5:/labels" $D/fib25-tiny.zarr labels 8
convert "$DATA/neuroproof/train.h5:/raw" $D/neuroproof.zarr raw 10
convert "$DATA/neuroproof/train.h5:/labels" $D/neuroproof.zarr labels 10
RESUME=()
if [ ! -f "$OUT/last.pt" ] && [ -f "$KEPT/last.pt" ]; then
    cp "$KEPT"/* "$OUT"/
    echo "resuming from the kept checkpoint in $KEPT" >&2
fi
[ -f "$OUT/last.pt" ] && RESUME=(--resume)
if [ -f "$OUT/pid" ] && kill -0 "$(cat "$OUT/pid")" 2>/dev/null; then
    echo "already running: pid $(cat "$OUT/pid") (log $OUT/train.log)" >&2
    exit 1
fi
ITER=${ITERATIONS:-$DEFAULT_ITERATIONS}
[ -f "$OUT/config.json" ] && ITER=$(.venv/bin/python -c "import json; print(json.load(open('$OUT/config.json'))['iterations'])")
echo "=== $(date -u +%FT%TZ) start/resume, commit $(git rev-parse --short HEAD)" >> "$OUT/train.log"
THREADS=${THREADS:-1}
OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS nohup setsid .venv/bin/psc-train em --raw $RAW --labels $LABELS \
    --out "$OUT" --conv $CONV --iterations "$ITER" --val-every 250 --threads "$THREADS" "${RESUME[@]}" "${EXTRA[@]}" \
    --export "runs/weights/em_unet3d_$RUN.pt" \
    --data-source "FIB-25 (janelia-flyem gala test data; Takemura et al. 2015) and/or NeuroProof training_sample2 (janelia-flyem neuroproof_examples; Parag et al. 2015), as listed under training.volumes" \
    --data-terms "FIB-25 crops: BSD-like (HHMI); NeuroProof: CC BY 3.0, attribute the Janelia FlyEM project" \
    >> "$OUT/train.log" 2>&1 < /dev/null &
echo $! > "$OUT/pid"
echo "pid $! (log $OUT/train.log)"
