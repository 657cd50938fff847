"""``psc-train``: train a psc model from labelled data (``psc-train mri ...``, ``psc-train em ...``).

Every default is the training configuration's own (``TrainConfig`` in
psc.pipelines.mri.train, ``EMTrainConfig`` in psc.pipelines.em.train).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from functools import partial
from pathlib import Path

from psc.app.cli import HelpFormatter, run_guarded
from psc.pipelines.allocator import keep_freed_memory
from psc.pipelines.options import option_default
from psc.utils.errors import InputError

PROG = "psc-train"
RUN_FOLDERS = {"mri": "runs/mri", "em": "runs/em"}  # --out without one


def _run_arguments(p: argparse.ArgumentParser, config: type) -> None:
    """What every training run takes: seed, threads, resume, export and the data's card."""
    default = partial(option_default, config)
    p.add_argument("--seed", type=int, default=default("seed"), help="random seed (sampling, initialisation)")
    p.add_argument("--threads", type=int, default=default("threads"),
                   help="torch CPU threads (0: as many as torch picks)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--export", default=default("export"), help="write the best weights + model card here at the end")
    p.add_argument("--data-source", default=default("data_source"),
                   help="where the training data comes from (model card)")
    p.add_argument("--data-terms", default=default("data_terms"),
                   help="the terms of use of the training data (model card)")


def _mri_parser(sub) -> None:
    from psc.pipelines.mri.data import AUGMENTATIONS
    from psc.pipelines.mri.train import TrainConfig

    default = partial(option_default, TrainConfig)
    p = sub.add_parser("mri", help="brain tissue model from (scan, <stem>_seg) pairs", formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="folder searched for <stem>.nii.gz + <stem>_seg.nii.gz pairs")
    p.add_argument("--out", default=RUN_FOLDERS["mri"], help="run folder: log.csv, curves.png, best.pt, last.pt")
    p.add_argument("--conv", default=default("conv"), help="conv3d or p{m}sc{n}")
    p.add_argument("--options", default=json.dumps(default("options")), help="backbone options as JSON")
    p.add_argument("--val", nargs="*", dest="val_cases", default=default("val_cases"),
                   help="validation case names; --val alone: none, every case trains and the last weights export")
    p.add_argument("--iterations", type=int, default=default("iterations"), help="training steps")
    p.add_argument("--val-every", type=int, default=default("val_every"), help="validate every N steps")
    p.add_argument("--batch", type=int, default=default("batch"), help="patches per step")
    p.add_argument("--patch", type=int, nargs=3, default=list(default("patch")), metavar=("X", "Y", "Z"),
                   help="training patch in model voxels")
    p.add_argument("--lr", type=float, default=default("lr"), help="peak learning rate")
    p.add_argument("--warmup", type=int, default=default("warmup"), help="iterations of linear learning-rate warm-up")
    p.add_argument("--init", default=default("init"), help="start from these weights (.pt with its card): fine-tuning")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=default("precision"),
                   help="bf16: autocast (on an AMX CPU 1.15x faster per step than fp32 for the P2SC2 DenseNet)")
    p.add_argument("--augmentation", choices=AUGMENTATIONS, default=default("augmentation"),
                   help="robust: scanner (gamma, contrast, bias field, noise) and resolution (1-2 mm, thick "
                   "slices) augmentation (pipelines/mri/augment.py); basic: flips and mild intensity changes")
    _run_arguments(p, TrainConfig)


def _em_parser(sub) -> None:
    from psc.pipelines.em.normalise import NORMALISATIONS
    from psc.pipelines.em.train import AUGMENTATIONS, EMTrainConfig

    default = partial(option_default, EMTrainConfig)
    p = sub.add_parser("em", help="affinity U-Net from raw and labels zarr volumes", formatter_class=HelpFormatter)
    p.add_argument("--raw", nargs="+", required=True,
                   help="raw volume(s) (zarr container or container/array); several train one model")
    p.add_argument("--labels", nargs="+", required=True,
                   help="instance labels, one per raw, of its shape (0 = boundary, ignored)")
    p.add_argument("--out", default=RUN_FOLDERS["em"], help="run folder: log.csv, curves.png, best.pt, last.pt")
    p.add_argument("--conv", default=default("conv"), help="conv3d or p{m}sc{n}")
    p.add_argument("--options", default=json.dumps(default("options")), help="U-Net options as JSON")
    p.add_argument("--iterations", type=int, default=default("iterations"), help="training steps")
    p.add_argument("--val-every", type=int, default=default("val_every"), help="validate every N steps")
    p.add_argument("--val-fraction", type=float, default=default("val_fraction"),
                   help="the last fraction of x is held out")
    p.add_argument("--batch", type=int, default=default("batch"), help="crops per step")
    p.add_argument("--out-size", type=int, default=default("out_size"),
                   help="output crop side (a valid U-Net output size)")
    p.add_argument("--lr", type=float, default=default("lr"), help="peak learning rate")
    p.add_argument("--long-range", nargs="*", type=int, default=default("long_range"),
                   help="distances (voxels) of the auxiliary long-range affinity targets; --long-range alone: none")
    p.add_argument("--lsd-sigma", type=float, default=default("lsd_sigma"),
                   help="> 0: train local shape descriptors (Sheridan et al. 2022) as auxiliary targets, "
                   "Gaussian window sigma in voxels (pipelines/em/lsd.py); 0: none")
    p.add_argument("--augmentation", choices=AUGMENTATIONS, default=default("augmentation"),
                   help="full: section defects, elastic, flips/transposes, contrast/gamma/noise/blur "
                   "(pipelines/em/augment.py); basic: flips, transposes and mild intensity changes")
    p.add_argument("--normalisation", choices=sorted(NORMALISATIONS), default=default("normalisation"),
                   help="raw -> network input, measured per volume (pipelines/em/normalise.py); onto the card")
    _run_arguments(p, EMTrainConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.replace("``", ""), formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="pipeline", required=True)
    _mri_parser(sub)
    _em_parser(sub)
    return parser


def configure(config: type, args: argparse.Namespace):
    """``config`` from the parsed options (each option is named after its field)."""
    try:
        options = json.loads(args.options)
    except ValueError as error:
        raise InputError(f"--options is not JSON ({error})") from None
    if not isinstance(options, dict):
        raise InputError(f"--options must be a JSON object of backbone options, not {args.options}")
    from psc.models import make_conv

    try:
        make_conv(args.conv)
    except ValueError as error:  # the conv registry's message says what the names look like
        raise InputError(f"--conv: {error}") from None
    names = {item.name for item in fields(config)}
    values = {name: tuple(value) if name == "patch" else value for name, value in vars(args).items() if name in names}
    return config(**{**values, "options": options})


def check_mri_data(cfg) -> None:
    """User mistakes caught before any training: no data, no pairs in it, validation
    cases that are not there, --init weights that are missing, corrupt or not MRI."""
    from psc.models.weights import MRI_TISSUE, read_card
    from psc.pipelines.mri.data import find_pairs

    data = Path(cfg.data)
    if not data.is_dir():
        raise InputError(f"--data {data}: no such folder")
    pairs = find_pairs(data)
    if not pairs:
        raise InputError(f"no (image, <stem>_seg) pairs found under {data}")
    missing = [case for case in cfg.val_cases if case not in {pair.case for pair in pairs}]
    if missing:
        raise InputError(f"validation cases not found: {missing} (the cases under {data}: "
                         f"{', '.join(pair.case for pair in pairs[:8])}{' ...' if len(pairs) > 8 else ''})")
    if cfg.init:
        read_card(cfg.init, MRI_TISSUE)


def check_em_data(cfg) -> None:
    """The raw and labels volumes exist and are zarr volumes (read before any training)."""
    from psc.pipelines.em.volumes import open_volume

    for path in (*cfg.raw, *cfg.labels):
        open_volume(path)


def run(args: argparse.Namespace) -> int:
    if args.pipeline == "em":
        from psc.pipelines.em.train import EMTrainConfig, train

        cfg = configure(EMTrainConfig, args)
        check_em_data(cfg)
    else:
        from psc.pipelines.mri.train import TrainConfig, train

        cfg = configure(TrainConfig, args)
        check_mri_data(cfg)
    keep_freed_memory()
    train(cfg, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
