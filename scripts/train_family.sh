#!/usr/bin/env bash
# Issue 17's equal-budget rows: the same network, data, recipe and budget for each of
# conv3d, p1sc1, p2sc2, cakes and jfd, on EM and on MRI, one run after another on one
# CPU thread. A finished row (its exported weights exist) is skipped; an interrupted one
# resumes exactly from runs/family-<task>-<conv>/last.pt (or the copy under checkpoints/).
#   scripts/train_family.sh                 # every row: em first, then mri
#   scripts/train_family.sh em              # the EM rows only
#   scripts/train_family.sh mri p2sc2 jfd   # some MRI rows
# The budgets (docs/results-em.md, docs/results-mri.md, "Equal budget: the convolution family"):
#   EM:  all three volumes, the shipped recipe, 400 iterations of batch 2 x 24^3, val every 100
#   MRI: the 9/2 IBSR split, 200 iterations of batch 2 x 48^3, basic augmentation, val every 50
# Runs in the foreground: start it with nohup ... & (the whole log goes to runs/family.log).
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${1:-em mri}
shift || true
CONVS=${*:-conv3d p1sc1 p2sc2 cakes jfd}
DATA=${PSC_DATA:-../shared/data}
D=runs/data
mkdir -p runs/weights
for TASK in $TASKS; do
    for CONV in $CONVS; do
        FOLDER=family-$TASK-$CONV OUT=runs/family-$TASK-$CONV KEPT=checkpoints/family-$TASK-$CONV
        WEIGHTS=runs/weights/family_${TASK}_$CONV.pt
        [ -f "$WEIGHTS" ] && { echo "$FOLDER: done ($WEIGHTS)"; continue; }
        mkdir -p "$OUT"
        if [ ! -f "$OUT/last.pt" ] && [ -f "$KEPT/last.pt" ]; then cp "$KEPT"/* "$OUT"/; fi
        RESUME=()
        [ -f "$OUT/last.pt" ] && RESUME=(--resume)
        echo "=== $(date -u +%FT%TZ) $FOLDER start/resume, commit $(git rev-parse --short HEAD)" | tee -a "$OUT/train.log"
        case "$TASK" in
            em)
                [ -d "$D/neuroproof.zarr/raw" ] || { echo "error: run scripts/train_em.sh once to make $D" >&2; exit 1; }
                OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/psc-train em \
                    --raw $D/fib25.zarr/raw $D/fib25-tiny.zarr/raw $D/neuroproof.zarr/raw \
                    --labels $D/fib25.zarr/labels $D/fib25-tiny.zarr/labels $D/neuroproof.zarr/labels \
                    --out "$OUT" --conv "$CONV" --iterations 400 --val-every 100 --threads 1 \
                    "${RESUME[@]}" --export "$WEIGHTS" \
                    --data-source "FIB-25 (janelia-flyem gala test data; Takemura et al. 2015) and NeuroProof training_sample2 (janelia-flyem neuroproof_examples; Parag et al. 2015)" \
                    --data-terms "FIB-25 crops: BSD-like (HHMI); NeuroProof: CC BY 3.0, attribute the Janelia FlyEM project" \
                    >> "$OUT/train.log" 2>&1 ;;
            mri)
                OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/psc-train mri --data "$DATA/ibsr18" \
                    --out "$OUT" --conv "$CONV" --iterations 200 --val-every 50 --patch 48 48 48 \
                    --augmentation basic --threads 1 "${RESUME[@]}" --export "$WEIGHTS" \
                    --data-source "IBSR (Internet Brain Segmentation Repository), Center for Morphometric Analysis, Massachusetts General Hospital; T1 MRI with manual tissue labels" \
                    --data-terms "research use for developing automated segmentation; acknowledge the source; the images and segmentations are not redistributed (these weights contain neither)" \
                    >> "$OUT/train.log" 2>&1 ;;
            *) echo "error: unknown task '$TASK' (em or mri)" >&2; exit 2 ;;
        esac
        echo "$FOLDER: $(tail -1 "$OUT/log.csv")"
    done
done
