"""``psc-segment``: tissue segmentation of T1 scans (files, folders, globs), or neuron
segmentation of an EM volume (``RAW.zarr -o OUT.zarr``).

MRI (skull on or off: ``--skull-strip auto`` extracts the brain when the skull is there):
writes ``<stem>_dseg.nii.gz``, ``_dseg.tsv``, ``_dseg.json`` (provenance and plausibility
warnings), ``_volumes.tsv``, ``_qc.png``, ``_desc-brain_mask.nii.gz`` when it extracted
the brain (and ``_probseg.nii.gz`` with ``--probabilities``) beside each input or under
``-o DIR``.
EM: writes the arrays ``affinities``, ``fragments`` and ``segmentation`` and the region
graph ``graph.sqlite`` into OUT.zarr; running the same command again resumes.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from psc.app.cli import HelpFormatter, add_option, filled, flag, given, run_guarded
from psc.app.segment_em import add_arguments as add_em_arguments
from psc.app.segment_em import run_em
from psc.models.shipped import ShippedWeights
from psc.pipelines.allocator import keep_freed_memory
from psc.pipelines.em.options import EM_ONLY
from psc.pipelines.em.volumes import names_zarr
from psc.pipelines.mri.options import MRI_ONLY, SAMPLE_OUTPUT, MRISegmentOptions
from psc.pipelines.options import option_default
from psc.pipelines.precision import PRECISIONS
from psc.utils.errors import InputError


PROG = "psc-segment"
MRI_GROUP = "MRI pipeline (scans)"
PIPELINES = {"mri": "the MRI pipeline (scans)", "em": "the EM pipeline (RAW.zarr inputs)"}
# One meaning per code, for scripts that loop over subjects (docs/mri.md says the same).
EXIT_CODES = """exit status (MRI):
  0    every scan segmented
  1    some inputs failed (a scan refused, a glob matching nothing...); the others were processed
  2    the command was refused before any scan (usage, an option, the weights, two inputs
       writing the same outputs)
  130  interrupted (Ctrl-C); a scan being written leaves no output"""


def is_label_map(path: Path) -> bool:
    """A label map or mask by its name, not a scan to segment: training's
    ``<stem>_seg``/``_dseg``/``_labels``/``_label`` (``pipelines/mri/data.LABEL_SUFFIXES``),
    psc's own outputs (``outputs.is_output``) and masks (``<stem>_mask``, e.g.
    ``_desc-brain_mask``)."""
    from psc.pipelines.mri.data import LABEL_SUFFIXES
    from psc.pipelines.mri.io import scan_stem
    from psc.pipelines.mri.outputs import is_output

    return is_output(path) or scan_stem(path).endswith((*LABEL_SUFFIXES, "_mask"))


def expand_inputs(items: list[str], unmatched: list[str] | None = None) -> list[Path]:
    """Files, DICOM folders, folders of scans and globs -> scan paths, in order.

    Label maps a folder holds or a glob matches (``is_label_map``: psc's training layout
    ``X.nii.gz`` + ``X_seg.nii.gz``, psc's own outputs) are not scans and are left out; a
    file named on its own is taken as given. An item that yields no scan (a glob matching
    nothing, a folder or glob of label maps only) is one sentence appended to
    ``unmatched``, so the other inputs still run, or raised without it. The same input
    named twice (or by name and by its folder) is kept once, where it first appears."""
    from psc.pipelines.mri.io import is_scan_file

    found: list[Path] = []
    seen: set[Path] = set()

    def refuse(problem: str) -> None:
        if unmatched is None:
            raise InputError(problem)
        unmatched.append(problem)

    def add(paths: list[Path]) -> None:
        for path in paths:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(path)

    for item in items:
        if any(c in item for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(item))]
            kept = [m for m in matches if not (m.is_file() and is_label_map(m))]
            if not kept:
                refuse(f"{item}: no file matches" if not matches else
                       f"{item}: matches only label maps ({matches[0].name}...), no scan to segment")
                continue
        else:
            kept = [Path(item)]
        for match in kept:
            if match.is_dir() and not names_zarr(match):
                files = sorted(p for p in match.iterdir() if is_scan_file(p))
                scans = [p for p in files if not is_label_map(p)]
                if files and not scans:
                    refuse(f"{match}: holds only label maps ({files[0].name}...), no scan to segment")
                    continue
                add(scans or [match])  # no scan files: treat as one DICOM series
            else:
                add([match])
    return found


def check_distinct_outputs(inputs: list[Path], out_dir: Path | None) -> None:
    """Refuse, before any work, two inputs whose outputs would land on the same paths
    (the same stem under one ``-o``, e.g. ``sub-*/T1.nii.gz -o out``): one would
    silently overwrite the other, even with ``--force``."""
    from psc.pipelines.mri.outputs import output_paths

    owners: dict[Path, Path] = {}
    for path in inputs:
        dseg = output_paths(path, out_dir, False)["dseg"]
        key = dseg.resolve()
        if key in owners:
            raise InputError(f"{owners[key]} and {path} would both write {dseg} (same name under one output "
                             "folder); rename one, or leave out -o to write beside each input")
        owners[key] = path


def window_size(text: str) -> tuple[int, int, int] | None:
    """``auto`` (None), ``N`` (a cube) or ``Z,Y,X``."""
    if text == "auto":
        return None
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, N or Z,Y,X") from None
    if len(sizes) not in (1, 3) or min(sizes) < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto, one size or three, each at least 8")
    return tuple(sizes * 3 if len(sizes) == 1 else sizes)  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    """psc-segment's options. Every option parses to ``None`` unless given (so an option
    of the other pipeline can be refused); the defaults shown and filled in are the
    fields of ``MRISegmentOptions`` and ``EMRunOptions``."""
    default = lambda name: option_default(MRISegmentOptions, name)  # noqa: E731
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.replace("``", ""), epilog=EXIT_CODES,
                                     formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="*", help="scans (NIfTI, MGZ, NRRD, MHA/MHD), DICOM folders, folders, globs")
    add_option(parser, "-o", "--output", type=Path, help="output folder (MRI) or OUT.zarr (EM)",
               default="beside each input; EM: RAW_psc.zarr beside RAW.zarr")
    parser.add_argument("--sample", action="store_true",
                        help=f"segment the bundled MNI152 T1 template (into ./{SAMPLE_OUTPUT} without -o)")
    parser.add_argument("--pipeline", choices=("auto", "mri", "em"), default="auto",
                        help="auto: .zarr inputs are EM, everything else MRI")
    add_option(parser, "--weights", type=Path, help="weights .pt with its .json card",
               default="the shipped MRI model (its coarse-scan twin for voxels over 2 mm) or EM model")
    add_option(parser, "--device", default=default("device"), help="auto, cpu, cuda or cuda:N")
    add_option(parser, "--precision", choices=PRECISIONS, default=default("precision"),
               help="network precision; auto: fp16 on CUDA, bf16 on CPUs with native bf16 "
               "(AVX512-BF16/AMX), else fp32")
    add_option(parser, "--force", action="store_true", help="overwrite existing outputs")
    mri = parser.add_argument_group(MRI_GROUP)
    add_option(mri, "--window", type=window_size, metavar="auto|N|Z,Y,X",
               default="auto" if default("window") is None else default("window"),
               help="sliding window in model voxels; auto: the whole brain crop in one window "
               "when it fits, else 96^3 tiles")
    add_option(mri, "--overlap", type=float, default=default("overlap"), help="sliding-window overlap in [0, 1)")
    add_option(mri, "--tta", action="store_true", help="average with the left-right mirrored prediction")
    add_option(mri, "--mask", type=Path, help="brain mask (same grid) instead of the nonzero voxels; "
               "overrides --skull-strip")
    add_option(mri, "--skull-strip", choices=("auto", "on", "off"), default=default("skull_strip"),
               help="brain extraction (deepbet) first; auto: only when the scan is not already "
               "skull-stripped (a constant background around at most 2.6 L); off: the nonzero voxels are the brain")
    add_option(mri, "--probabilities", action="store_true", help="also write <stem>_probseg.nii.gz")
    add_em_arguments(parser)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.inputs and not args.sample:
        parser.error("give at least one input, or --sample")
    return args


def refuse_other_pipeline(args: argparse.Namespace, pipeline: str) -> None:
    """Options of the other pipeline are refused, not ignored: one line naming the
    pipeline they belong to."""
    other, inputs = ("em", "MRI scans") if pipeline == "mri" else ("mri", "EM volumes (RAW.zarr)")
    names = given(args, EM_ONLY if pipeline == "mri" else MRI_ONLY)
    if names:
        flags = ", ".join(flag(name) for name in names)
        raise InputError(f"{flags} appl{'ies' if len(names) == 1 else 'y'} to {PIPELINES[other]}, not to {inputs}")


def run(args: argparse.Namespace, console: Console) -> int:
    from psc.models.weights import MRI_TISSUE
    from psc.pipelines.inference import load_network
    from psc.pipelines.mri.io import read_scan
    from psc.models.weights import sha256_of
    from psc.pipelines.mri.brain import BrainStage
    from psc.pipelines.mri.outputs import check_outputs, output_paths, write_outputs
    from psc.pipelines.mri.plausibility import check as plausibility
    from psc.pipelines.mri.sample import sample_t1_path
    from psc.pipelines.mri.default_model import default_model_for

    unmatched: list[str] = []  # items that yield no scan: reported, the other inputs still run
    inputs = expand_inputs(args.inputs, unmatched)
    if args.sample:
        inputs.append(sample_t1_path())
        args.output = args.output or SAMPLE_OUTPUT
    for problem in unmatched:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
    if not inputs:
        return 1
    em = args.pipeline == "em" or (args.pipeline == "auto" and any(names_zarr(p) for p in inputs))
    refuse_other_pipeline(args, "em" if em else "mri")
    if em:
        return run_em(args, inputs, console) or (1 if unmatched else 0)
    check_distinct_outputs(inputs, args.output)
    options = filled(args, MRISegmentOptions)
    if not 0 <= options.overlap < 1:
        raise InputError(f"--overlap must be in [0, 1), got {options.overlap}")
    if options.weights is None:
        for record in (ShippedWeights.MRI_TISSUE.value, ShippedWeights.MRI_TISSUE_COARSE.value):
            if not record.path.is_file():
                raise InputError(f"the default weights are missing from this installation ({record.path}); "
                                 "reinstall psc or give --weights PATH")
    networks: dict[Path, object] = {}

    def network_for(path: Path):
        """Once per weights file and command, not per scan: sha256 and kind checked,
        fused, on its device. Without --weights the scan's voxel size chooses the
        shipped model (pipelines/mri/default_model.py)."""
        if path not in networks:
            networks[path] = load_network(path, MRI_TISSUE, options.device, options.precision)
        return networks[path]

    first = network_for(Path(options.weights) if options.weights else ShippedWeights.MRI_TISSUE.value.path)
    mask = read_scan(options.mask, labels=True) if options.mask else None
    # deepbet on psc's device (cpu unless CUDA was chosen), loaded on the first scan needing it.
    brain_stage = BrainStage(options.skull_strip, mask, str(first.device))
    settings = {"skull_strip": options.skull_strip, "mask": str(options.mask) if options.mask else None,
                "device": str(first.device), "precision": first.precision, "window": options.window,
                "overlap": options.overlap, "tta": options.tta}

    failures = len(unmatched)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("segmenting", total=len(inputs))
        windows = progress.add_task("  windows", total=None)
        on_window = lambda done, total: progress.update(windows, completed=done, total=total)  # noqa: E731
        for path in inputs:
            progress.update(task, description=f"segmenting {path.name}")
            progress.reset(windows, total=None)
            started = time.perf_counter()
            try:
                paths = output_paths(path, args.output, options.probabilities, brain_stage.may_extract)
                check_outputs(paths, options.force)
                scan = read_scan(path)
                weights = Path(options.weights) if options.weights else default_model_for(scan.voxel_sizes).path
                network = network_for(weights)
                card = network.card
                brain = brain_stage(scan)
                if not brain.extracted:
                    paths.pop("brain_mask", None)
                # imported here, after the brain step, not with the others: it imports MONAI (all
                # of it, scipy and pandas with it), and the command measured 1.0-1.4 s faster
                # so on a 1 mm head (2 cores, bf16; docs/results-mri.md); a thread importing it
                # during deepbet was slower still (it takes a core from torch)
                from psc.pipelines.mri.inference import segment_scan

                seg = segment_scan(scan, network, card, overlap=options.overlap, tta=options.tta, mask=brain.mask,
                                   window=options.window, on_window=on_window)
                brain_array = brain.mask.array if brain.mask is not None else None
                warnings = plausibility(seg.labels, card.labels, scan.voxel_volume, brain_array, scan.voxel_sizes)
                weights_record = {"Path": str(weights.resolve()), "SHA256": card.sha256 or sha256_of(weights)}
                sidecar = {"Sources": [str(Path(path).resolve())], "Weights": weights_record, "Options": settings,
                           "SkullStrip": brain.record(), "Warnings": warnings}
                write_outputs(seg, scan, paths, card.labels, brain_array, sidecar,
                              keep=(options.mask,) if options.mask else ())
            except InputError as error:
                failures += 1
                print(f"{PROG}: error: {error}", file=sys.stderr)
                progress.advance(task)
                continue
            for warning in warnings:  # never silently wrong: stderr, and the _dseg.json sidecar
                print(f"{PROG}: warning: {path.name}: {warning}", file=sys.stderr)
            report(console, path, paths, seg, card.labels, scan.voxel_volume, time.perf_counter() - started, brain)
            if options.weights is None and weights != ShippedWeights.MRI_TISSUE.value.path:
                console.print(f"  model: {weights.name} (voxels coarser than 2 mm)", highlight=False)
            progress.advance(task)
    return 1 if failures else 0


def report(console: Console, path: Path, paths: dict[str, Path], seg, names: dict[int, str],
           voxel_volume: float, seconds: float, brain=None) -> None:
    """Per scan: where its outputs went, the tissue volumes, how long it took and how
    the network ran (precision, windows), since both change the time; and the brain
    step: whether psc extracted the brain (and its volume, and why)."""
    counts = np.bincount(seg.labels.ravel(), minlength=max(names) + 1)
    volumes = ", ".join(f"{name} {counts[i] * voxel_volume / 1000:.1f} ml" for i, name in names.items() if i)
    windows = f"{seg.windows} window{'s' if seg.windows != 1 else ''}"
    console.print(f"{path.name}: {seconds:.1f} s ({seg.precision}, {windows}); {volumes}", highlight=False,
                  soft_wrap=True)
    if brain is not None:
        if brain.extracted:
            litres = int((brain.mask.array > 0).sum()) * voxel_volume / 1e6
            step = f"brain extracted (deepbet, {brain.seconds:.1f} s): {litres:.2f} L; {brain.decision.reason}"
        else:
            step = f"no brain extraction: {brain.decision.reason}"
        console.print(f"  {step}", highlight=False, soft_wrap=True)
    for output in paths.values():
        console.print(f"  {output}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """The command (the console script reaches it through ``app/launch.py``, which also
    turns Ctrl-C while this module imports into exit code 130)."""
    args = parse(argv)
    keep_freed_memory()
    return run_guarded(PROG, lambda: run(args, Console(highlight=False)))


if __name__ == "__main__":
    sys.exit(main())
