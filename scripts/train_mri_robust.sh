#!/usr/bin/env bash
# Start, or resume exactly (from runs/<folder>/last.pt, or the copy a session committed
# under checkpoints/<folder>/), one of issue 13's MRI training runs in the background:
# scripts/train_mri_robust.py RUN under nohup, one thread, stdout and stderr appended to
# runs/<folder>/train.log, its PID in runs/<folder>/pid.
#   scripts/train_mri_robust.sh            # p2sc2-eq -> mri-p2sc2-eq-robust
#   scripts/train_mri_robust.sh conv3d     # its conv3d twin -> mri-conv3d-robust
#   scripts/train_mri_robust.sh shipped    # p2sc2-eq on all 11 scans -> mri-p2sc2-eq-shipped
#   scripts/train_mri_robust.sh p2sc2-robust  # the robust recipe at the default model's widths (9/2)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-p2sc2-eq}
case "$RUN" in
    p2sc2-eq) FOLDER=mri-p2sc2-eq-robust ;;
    conv3d) FOLDER=mri-conv3d-robust ;;
    shipped) FOLDER=mri-p2sc2-eq-shipped ;;
    p2sc2-robust) FOLDER=mri-p2sc2-robust ;;
    *) echo "error: unknown run '$RUN' (p2sc2-eq, conv3d, shipped or p2sc2-robust)" >&2; exit 2 ;;
esac
OUT=runs/$FOLDER
KEPT=checkpoints/$FOLDER  # committed at a session's end (runs/ is not kept)
mkdir -p "$OUT"
if [ ! -f "$OUT/last.pt" ] && [ -f "$KEPT/last.pt" ]; then
    cp "$KEPT"/* "$OUT"/
    echo "resuming from the kept checkpoint in $KEPT" >&2
fi
if [ -f "$OUT/pid" ] && kill -0 "$(cat "$OUT/pid")" 2>/dev/null; then
    echo "already running: pid $(cat "$OUT/pid") (log $OUT/train.log)" >&2
    exit 1
fi
echo "=== $(date -u +%FT%TZ) start/resume, commit $(git rev-parse --short HEAD)" >> "$OUT/train.log"
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup setsid .venv/bin/python scripts/train_mri_robust.py "$RUN" \
    >> "$OUT/train.log" 2>&1 < /dev/null &
echo $! > "$OUT/pid"
echo "pid $! (log $OUT/train.log)"
