#!/usr/bin/env bash
# Start, or resume exactly (from runs/mri-p2sc2-eq-robust/last.pt, or the copy a session
# committed under checkpoints/mri-p2sc2-eq-robust/), issue 13's MRI
# training run in the background: scripts/train_mri_robust.py under nohup, one thread,
# stdout and stderr appended to runs/mri-p2sc2-eq-robust/train.log, its PID in
# runs/mri-p2sc2-eq-robust/pid. Run it from anywhere: scripts/train_mri_robust.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/mri-p2sc2-eq-robust
KEPT=checkpoints/mri-p2sc2-eq-robust  # committed at a session's end (runs/ is not kept)
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
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup setsid .venv/bin/python scripts/train_mri_robust.py \
    >> "$OUT/train.log" 2>&1 < /dev/null &
echo $! > "$OUT/pid"
echo "pid $! (log $OUT/train.log)"
