"""``psc-segment RAW.zarr -o OUT.zarr``: the EM half of psc-segment (every stage, resumable)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

import psc.models
from psc.utils.errors import InputError

DEFAULT_EM_WEIGHTS = Path(psc.models.__file__).parent / "pretrained" / "em_unet3d_p2sc2.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    em = parser.add_argument_group("EM pipeline (RAW.zarr inputs)")
    em.add_argument("--workers", type=int, default=1, help="worker processes per stage (0: in this process)")
    em.add_argument("--threshold", type=float, help="agglomeration threshold of the written segmentation "
                    "(default: the model card's best validation threshold, else 0.5)")
    em.add_argument("--thresholds", type=float, nargs="+", help="thresholds whose lookup tables are stored "
                    "(default 0.1 ... 0.9)")
    em.add_argument("--block-size", type=int, nargs=3, default=[64, 64, 64], metavar=("Z", "Y", "X"),
                    help="block (and chunk) shape in voxels, multiples of 4")
    em.add_argument("--gt", help="ground-truth labels (zarr): score every threshold at the end")
    em.add_argument("--worker-command", help="start each worker with this shell command instead (e.g. "
                    "'ssh node psc-worker {out}'); DAISY_CONTEXT tells it where the scheduler is")
    em.add_argument("--host", help="address workers connect to (default: detected; 127.0.0.1 keeps it local)")
    em.add_argument("--spool", action="store_true", help="start no workers: post them under OUT.zarr/.workers/ "
                    "for running 'psc-worker --serve OUT.zarr' processes (containers) to take")
    from psc.pipelines.em.stages import STAGES

    em.add_argument("--stage", nargs="+", choices=[stage.name for stage in STAGES],
                    help="run only these stages, each on its own, in pipeline order (default: all, the chained "
                    "ones as one daisy pipeline). " + "; ".join(f"{stage.name}: {stage.description}"
                                                              for stage in STAGES).replace("%", "%%"))


def default_output(raw: Path) -> Path:
    """``fib.zarr`` or ``fib.zarr/raw`` -> ``fib_psc.zarr`` beside the container, never inside it."""
    container = next((p for p in (raw, *raw.parents) if p.name.endswith(".zarr")), raw)
    return container.with_name(container.name.removesuffix(".zarr") + "_psc.zarr")


def run_em(args: argparse.Namespace, inputs: list[Path], console: Console) -> int:
    from psc.pipelines.em import layout
    from psc.pipelines.em.evaluate import evaluate_run, format_table
    from psc.pipelines.em.run import STAGE_NAMES, EMRunError, check_spool, prepare, run
    from psc.pipelines.devices import parse_device, resolve_device

    if len(inputs) != 1:
        raise InputError("the EM pipeline takes one RAW.zarr input per call")
    raw = inputs[0]
    out = args.output or default_output(raw)
    if not str(out).endswith(".zarr"):
        raise InputError(f"{out}: the EM output must be a .zarr container")
    weights = args.weights or DEFAULT_EM_WEIGHTS
    if not Path(weights).is_file():
        raise InputError(f"EM weights not found: {weights}")
    from psc.models.weights import ModelCard, card_path

    try:
        card = ModelCard.from_json(card_path(weights))
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"{weights}: no readable model card beside it ({error})") from None
    if card.backbone != "unet3d" or card.out_channels != 3:
        raise InputError(f"{weights}: a {card.backbone} model, not an affinity U-Net for EM")
    if args.threshold is None:
        args.threshold = float(card.metrics.get("val_best_threshold", 0.5))
    if args.workers < 0:
        raise InputError(f"--workers must be >= 0, got {args.workers}")
    check_spool(args.spool, args.workers, args.worker_command)
    if args.spool or args.worker_command:
        parse_device(args.device)  # the workers' machines have the GPUs, not necessarily this one;
        device = args.device       # auto is resolved by each worker
    else:
        device = str(resolve_device(args.device))
    if args.force and Path(out).exists():
        shutil.rmtree(out)
    resuming = (Path(out) / layout.TRACKING_DIR).exists()
    thresholds = args.thresholds or layout.DEFAULT_THRESHOLDS
    started = time.perf_counter()
    try:
        prepare(str(raw), out, weights, block_size=args.block_size, thresholds=thresholds,
                threshold=args.threshold, device=device, precision=args.precision,
                workers=max(1, args.workers))
    except OSError as error:
        raise InputError(f"{out}: cannot write here ({error.strerror or error})") from None
    if resuming:
        console.print(f"resuming the run in {out}", highlight=False)
    try:
        stages = tuple(args.stage) if args.stage else STAGE_NAMES
        result = run(out, workers=args.workers, worker_command=args.worker_command, host=args.host, stages=stages,
                     spool=args.spool)
    except EMRunError as error:
        print(f"psc-segment: error: {error}", file=sys.stderr)
        return 1
    segments = result["segments"].get(float(args.threshold))
    summary = f"; {segments} segments at threshold {args.threshold:g}" if segments is not None else ""
    console.print(f"{raw}: {time.perf_counter() - started:.1f} s{summary}", highlight=False)
    if "relabel" in stages:
        from psc.pipelines.em.qc import write_qc

        write_qc(out)
    for name in (layout.AFFINITIES, layout.FRAGMENTS, layout.SEGMENTATION, layout.GRAPH_FILE, "qc.png"):
        if (Path(out) / name).exists():
            console.print(f"  {Path(out) / name}", highlight=False)
    if args.gt:
        print(format_table(evaluate_run(str(out), args.gt, progress=sys.stderr.isatty())))
    return 0
