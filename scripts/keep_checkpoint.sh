#!/usr/bin/env bash
# Copy a running training's resumable state from runs/<folder>/ to checkpoints/<folder>/
# (committed, so the next session resumes exactly: a session stops hard and runs/ does
# not survive it). Copies last.pt first through a temporary name, so a copy interrupted
# half-way never replaces a good one.
#   scripts/keep_checkpoint.sh em-shipped-long [em-conv3d-long ...]
set -euo pipefail
cd "$(dirname "$0")/.."
for FOLDER in "$@"; do
    SRC=runs/$FOLDER DST=checkpoints/$FOLDER
    [ -f "$SRC/last.pt" ] || { echo "error: $SRC/last.pt does not exist" >&2; exit 1; }
    mkdir -p "$DST"
    for NAME in last.pt best.pt log.csv config.json curves.png best.json train.log; do
        [ -f "$SRC/$NAME" ] || continue
        cp "$SRC/$NAME" "$DST/.$NAME.partial" && mv "$DST/.$NAME.partial" "$DST/$NAME"
    done
    echo "$FOLDER: kept at iteration $(tail -1 "$DST/log.csv" | cut -d, -f1)"
done
