"""One EM run, end to end: the stages declared in ``stages.STAGES``, in that order
(predict -> fragments -> edges (daisy, blockwise), global merge, relabel (daisy, blockwise)).

This module runs stages and knows none of them by name: what a stage reads, writes,
needs as context, chains with and forgets is its declaration's business. Each blockwise
stage is a daisy task whose read ROI is its write ROI plus the context it needs; daisy
orders blocks so that a block only starts once every upstream block its read
ROI touches is done, runs them on ``workers`` processes, retries a failing block
``MAX_RETRIES`` times and keeps a done marker per block under ``.tracking/``: running the
same command again after a crash only does what is left.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import daisy
import zarr
from funlib.geometry import Coordinate, Roi

from psc.models.weights import EM_AFFINITY, read_card
from psc.utils.errors import InputError

from ..precision import check_precision
from . import graph_url, layout
from .intensity import measure
from .lock import LOCK_FILE, run_lock
from .spool import SpoolWorker, finish_run, start_run
from .stages import STAGE_NAMES, STAGES, BlockFunction, Stage, StageWorker
from .volumes import create_run_volume, fingerprint, is_zarr_path, open_container, open_volume, remove_run_volumes

__all__ = ["STAGE_NAMES", "EMRunError", "StageReport", "check_inputs", "check_output", "check_output_container",
           "check_spool", "check_thresholds", "clear_run", "fit_block_size", "prepare", "run"]

MAX_RETRIES = 2
BLOCK_TIMEOUT_S = 3600


class EMRunError(RuntimeError):
    """Blocks failed after their retries; the message names them."""


@dataclass
class StageReport:
    task: str
    blocks: int
    done: int
    failed: int


class RemoteWorker:
    """A daisy worker function that starts ``command`` (e.g. ``ssh node psc-worker
    {out}``) with the scheduler's address in ``DAISY_CONTEXT``: how workers on other
    machines join a run. ``{out}`` and ``{context}`` in the command are filled in."""

    def __init__(self, command: str, out: str) -> None:
        self.command, self.out = command, out

    def __call__(self, *, context) -> None:
        env = dict(os.environ, DAISY_CONTEXT=context.to_env())
        command = self.command.format(out=shlex.quote(self.out), context=shlex.quote(context.to_env()))
        subprocess.run(command, shell=True, env=env, check=True)


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(raw: str | Path, out: str | Path) -> None:
    """Refuse an output that is, contains or lies inside the input: the raw array, or the
    zarr container(s) it sits in (``X.zarr/raw -o X.zarr`` would write into, and with
    --force delete, the input). Paths are compared resolved (symlinks followed)."""
    raw_path, out_path = Path(raw).resolve(), Path(out).resolve()
    input_root = raw_path
    for parent in raw_path.parents:  # the outermost zarr container holding the raw
        if parent.name.endswith(".zarr") or is_zarr_path(parent):
            input_root = parent
        else:
            break
    if _within(out_path, input_root) or _within(raw_path, out_path):
        raise InputError(f"{out}: the output is, contains or lies inside the input {raw}: choose another -o")


def _is_run(out: Path) -> bool:
    try:
        return "psc" in zarr.open_group(str(out), mode="r").attrs
    except Exception:  # zarr raises several kinds for a folder that is not a group
        return False


def check_output_container(out: str | Path) -> bool:
    """Whether ``out`` holds a psc run (False: nothing there yet, or an empty folder or
    zarr group). Anything else (another container, a file, someone's data) is refused,
    with or without --force: a run never writes into, nor deletes, what it did not make."""
    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder: choose another -o")
    if _is_run(out):
        return True
    if {entry.name for entry in out.iterdir()} - {LOCK_FILE, "zarr.json", ".zgroup", ".zattrs"}:
        raise InputError(f"{out} is not a psc run and not empty: choose another -o "
                         "(--force only removes what a psc run wrote)")
    return False


def clear_run(out: str | Path) -> None:
    """``--force``: remove what a psc run wrote in ``out`` (the images its stages create,
    in either layout, with their OME-Zarr metadata; ``layout.RUN_FILES``; its settings),
    nothing else: foreign arrays and files in the container stay, and so does the lock file."""
    out = Path(out)
    if not _is_run(out):
        return
    # a PostgreSQL graph (or a SQLite file elsewhere) is the run's too: its schema goes first
    graph_url.clear_graph(zarr.open_group(str(out), mode="r").attrs["psc"].get("graph", ""), out)
    arrays = {array.name for stage in STAGES for array in stage.creates}
    remove_run_volumes(out, sorted(arrays))
    for name in layout.RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    zarr.open_group(str(out), mode="a").attrs.pop("psc", None)


def _normal(value):
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def check_thresholds(thresholds, what: str = "threshold") -> tuple[float, ...]:
    """Agglomeration thresholds are affinities: each in [0, 1] (NaN refused); a value
    outside agglomerates everything or nothing without a word. ``what`` names them in the
    error (the command line passes its option)."""
    values = tuple(float(t) for t in thresholds)
    bad = [t for t in values if not 0.0 <= t <= 1.0]  # NaN fails both comparisons
    if bad:
        raise InputError(f"{what} {bad[0]:g} is outside [0, 1]: thresholds are affinities")
    return values


def fit_block_size(block_size, shape) -> tuple[int, int, int]:
    """``block_size`` checked (positive multiples of 4) and, along any axis where it is
    larger than the volume, shrunk to the volume rounded up to a multiple of 4: a block is
    also the chunk of every array, so an oversized one would allocate its whole size."""
    block_size = tuple(int(b) for b in block_size)
    if len(block_size) != 3 or any(b <= 0 or b % 4 for b in block_size):
        raise InputError(f"block size {block_size}: each of its 3 sides must be a positive multiple of 4")
    return tuple(min(b, -(-int(s) // 4) * 4) for b, s in zip(block_size, shape))


def check_inputs(raw: str | Path, out: str | Path, weights: str | Path, *, raw_name: str | None = None,
                 block_size=layout.RunSettings.block_size, precision: str = "fp32", thresholds=()):
    """What :func:`prepare` refuses before it writes anything (weights, the output's place,
    the raw and its intensities, the block size, the thresholds, the output container);
    psc-segment calls it before it takes the run's lock, which creates ``out``. Returns
    the card, the raw, the block size (fitted to the volume) and the raw's intensity
    record with its warnings (``intensity.measure``)."""
    card = read_card(weights, EM_AFFINITY)
    check_precision(precision)
    check_thresholds(thresholds)
    check_output(raw, out)
    source = open_volume(raw, raw_name)
    if source.channels:
        raise InputError(f"{raw}: raw must be a single-channel 3-D volume, got shape {source.array.shape}")
    block_size = fit_block_size(block_size, source.shape)
    measured = measure(source, str(raw))
    check_output_container(out)
    return card, source, block_size, measured


def prepare(raw: str, out: str | Path, weights: str | Path, *, raw_name: str | None = None,
            block_size=layout.RunSettings.block_size, thresholds=layout.DEFAULT_THRESHOLDS, threshold: float = 0.5,
            device: str = "cpu", precision: str = "fp32", workers: int = 1,
            force: bool = False, graph: str | None = None) -> layout.RunSettings:
    """Create (or reopen, for a resume) the output container and its arrays.

    ``precision`` (``psc.pipelines.precision``) is resolved by each worker on its own
    device. In fp32 a blockwise run equals a whole-volume run to float rounding; in
    bf16/fp16 to that precision's rounding. The weights are verified here, once, before
    any array is written (file, sha256 against the card, an EM affinity model): a corrupt
    or wrong file is one clear error, not a failure in every worker's first block.

    Refused before anything is written: an output that overlaps the input
    (:func:`check_output`), a container that is not a psc run (:func:`check_output_container`),
    a run held by another process (``lock.run_lock``), and a resume whose fixed settings
    (``layout.SETTING_RULES``), raw content or weights content differ. ``force``: remove
    what the earlier run wrote (:func:`clear_run`) and start over. ``graph``: the region
    graph's URL (``graph_url.for_run``: None, a resume's recorded one or the SQLite file in
    ``out``; a PostgreSQL URL without a schema gets the run's own)."""
    graph_url.parse(graph)  # a bad URL refused before anything is written
    card, source, block_size, (intensity, warnings) = check_inputs(
        raw, out, weights, raw_name=raw_name, block_size=block_size, precision=precision,
        thresholds=(*thresholds, threshold))
    thresholds = tuple(sorted({float(t) for t in thresholds} | {float(threshold)}))
    settings = layout.RunSettings(
        raw=str(Path(raw).resolve()), raw_name=raw_name, weights=str(Path(weights).resolve()),
        block_size=block_size, thresholds=thresholds, threshold=float(threshold), device=device,
        precision=check_precision(precision), threads_per_worker=max(1, (os.cpu_count() or 1) // max(1, workers)),
        weights_sha256=card.sha256, raw_fingerprint=fingerprint(source), raw_intensity=intensity,
        warnings=list(warnings),
    )
    with run_lock(out):
        check_output_container(out)  # again, under the lock
        if force:
            clear_run(out)
        group = open_container(out, mode="a")
        previous = group.attrs.get("psc")
        if previous is not None:
            previous = {"graph": "", **previous}  # runs from before --graph: the SQLite file
        settings.graph = graph_url.for_run(graph, out, previous["graph"] if previous is not None else None)
        if previous is not None:
            now = asdict(settings)
            changed = []
            for key in layout.fixed_settings():
                if key not in previous or (key in ("weights_sha256", "raw_fingerprint") and not previous[key]):
                    continue  # a run prepared before the setting existed
                if _normal(previous[key]) != _normal(now[key]):
                    changed.append(key)
            if "raw_fingerprint" in changed:
                raise InputError(f"{raw} changed since the run in {out} began (its shape, dtype, chunks or "
                                 "content): start over with --force or another -o")
            if "weights_sha256" in changed:
                changed[changed.index("weights_sha256")] = "weights (same path, other content)"
            if "graph" in changed:
                changed[changed.index("graph")] = (f"graph ({graph_url.parse(previous['graph']).describe()}; "
                                                   "leave out --graph to resume with it)")
            if changed:
                raise InputError(f"{out} holds a run with other {', '.join(changed)}: these are fixed for a run; "
                                 "start over with --force or another -o")
            settings.extra = dict(previous.get("extra") or {})
            if "edge_context" not in previous:  # prepared before it: the edges stage keeps the run's context
                settings.edge_context = tuple(previous.get("context", settings.context))
        chunks = block_size
        common = dict(voxel_size=source.voxel_size, offset=source.offset, chunks=chunks)
        for stage in STAGES:
            for array in stage.creates:
                # the OME-Zarr image layout (layout.py); a run begun in the older flat one stays flat
                create_run_volume(group, array.name, source.shape, array.dtype, channels=array.channels, **common)
        for stage in STAGES:  # what depends on the run's geometry (downsample's levels)
            stage.prepare_arrays(group, settings, source.shape, source.voxel_size, source.offset)
        settings.save(out)
    return settings


def _task(stage: Stage, out: str, shape: Coordinate, block: Coordinate, context: Coordinate,
          workers: int, worker_command: str | None, spool: bool = False) -> daisy.Task:
    if spool:
        function = SpoolWorker(out)
    elif worker_command:
        function = RemoteWorker(worker_command, out)
    elif workers > 0:
        function = StageWorker(stage, out)
    else:  # serial, in this process
        function = stage.block_function(out)
    return daisy.Task(
        stage.name,
        total_roi=Roi((0, 0, 0), shape).grow(context, context),
        read_roi=Roi((0, 0, 0), block + context * 2),
        write_roi=Roi(context, block),
        process_function=function,
        read_write_conflict=False,
        fit="shrink",
        max_workers=max(1, workers),
        max_retries=MAX_RETRIES,
        timeout=BLOCK_TIMEOUT_S,
        tracking_path=str(layout.tracking_path(out, stage.name)),
    )


@contextmanager
def _scheduler_stderr_to(path: Path):
    """daisy's scheduler (Rust) logs every failing block's traceback on file descriptor 2:
    send that descriptor to a log file, while Python's ``sys.stderr`` (progress bars, our
    one-line errors) keeps writing to the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    original = sys.stderr
    saved = os.dup(2)
    try:
        terminal_is_fd2 = original.fileno() == 2
    except (AttributeError, OSError, ValueError):
        terminal_is_fd2 = False
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    if terminal_is_fd2:
        sys.stderr = open(saved, "w", buffering=1, closefd=False, encoding=original.encoding, errors="replace")
    try:
        yield
    finally:
        sys.stderr.flush()
        if terminal_is_fd2:
            sys.stderr.close()
        sys.stderr = original
        os.dup2(saved, 2)
        os.close(saved)


def _run_pipeline(pipeline, tasks, workers: int, progress: bool, host: str | None, log: Path) -> list[StageReport]:
    try:
        with _scheduler_stderr_to(log):
            states = daisy.run_blockwise(pipeline, multiprocessing=workers > 0, progress=progress,
                                         return_states=True, host=host, summary=False)
    except RuntimeError as error:  # daisy abandons a task whose workers keep crashing
        raise EMRunError(f"workers kept crashing: {str(error).strip().splitlines()[0]}") from None
    reports, failures = [], []
    for task in tasks:
        state = states[task.task_id]
        done = state.completed_count
        failed = state.total_block_count - done
        reports.append(StageReport(task.task_id, state.total_block_count, done, failed))
        if state.failed_count:
            rois = ["[" + ", ".join(f"{b}:{e}" for b, e in zip(block.write_roi.begin, block.write_roi.end)) + "]"
                    for block in task.failed_blocks()]
            shown = ", ".join(rois[:5]) + (f" and {len(rois) - 5} more" if len(rois) > 5 else "")
            reason = state.last_worker_error.strip().splitlines()[-1] if state.last_worker_error else ""
            failures.append(f"{task.task_id}: {state.failed_count} of {state.total_block_count} blocks failed "
                            f"after {MAX_RETRIES} retries (write regions {shown}){': ' + reason if reason else ''}")
        elif failed:
            failures.append(f"{task.task_id}: {failed} blocks not run (their inputs failed)")
    if failures:
        raise EMRunError("; ".join(failures) + f"; logs in {log.parent}")
    return reports


def check_spool(spool: bool, workers: int, worker_command: str | None) -> None:
    """Spooled workers are posted for ``psc-worker --serve`` processes: there must be at
    least one, and no command of their own (checked by the command line before it
    writes anything, and by :func:`run`)."""
    if spool and (worker_command or workers < 1):
        raise InputError("--spool needs --workers >= 1 and no --worker-command")


def run(out: str | Path, workers: int = 1, worker_command: str | None = None, host: str | None = None,
        progress: bool = True, stages: tuple[str, ...] = STAGE_NAMES, spool: bool = False) -> dict:
    """Run (or resume) the stages of the run prepared in ``out``, in the order of
    ``stages.STAGES`` whatever the order of ``stages``.

    All stages: predict -> fragments -> edges (each ``chains_after`` the one before) as
    one daisy pipeline with block dependencies (a fragments block starts as soon as the
    predict blocks under its read ROI are done), then the global merge, then relabel. A
    subset runs each named stage on its own, in order (what ``--stage`` and the
    benchmark use); it is the caller's business that the stages before it are done.

    ``spool``: start no workers; post each one under ``out/.workers/`` for the
    ``psc-worker --serve`` processes already running (``spool.py``), and tell them when
    the run is finished, whatever its outcome.
    """
    unknown = set(stages) - set(STAGE_NAMES)
    if unknown:
        raise InputError(f"unknown stage(s) {sorted(unknown)}: choose from {', '.join(STAGE_NAMES)}")
    check_spool(spool, workers, worker_command)
    out = str(out)
    graph_url.check_shared(layout.RunSettings.load(out).graph, worker_command, spool, host)
    with run_lock(out):  # the scheduler's; workers never take it (lock.py)
        return _run_spooled(out, workers, worker_command, host, progress, stages, spool)


def _run_spooled(out: str, workers: int, worker_command: str | None, host: str | None, progress: bool,
                 stages: tuple[str, ...], spool: bool) -> dict:
    if not spool:
        return _run(out, workers, worker_command, host, progress, stages, False)
    run_id = start_run(out)
    ok = False
    try:
        result = _run(out, workers, worker_command, host, progress, stages, True)
        ok = True
        return result
    finally:
        finish_run(out, run_id, ok)


def _groups(stages: tuple[str, ...]) -> list[list[Stage]]:
    """The chosen stages in table order, as the groups that run together: when every
    stage runs, a stage that ``chains_after`` the one before joins its daisy pipeline
    (predict -> fragments -> edges); a subset runs each stage on its own."""
    chosen = [stage for stage in STAGES if stage.name in stages]
    chain = tuple(stages) == STAGE_NAMES
    groups: list[list[Stage]] = []
    for stage in chosen:
        if chain and groups and stage.chains_after is not None and groups[-1][-1].name == stage.chains_after:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def _run(out: str, workers: int, worker_command: str | None, host: str | None, progress: bool,
         stages: tuple[str, ...], spool: bool) -> dict:
    settings = layout.RunSettings.load(out)
    shape = Coordinate(open_volume(out, layout.FRAGMENTS).shape)
    block = Coordinate(settings.block_size)
    daisy.logging.set_log_basedir(Path(out) / ".logs")
    logging.getLogger("daisy").setLevel(logging.WARNING)
    log = Path(out) / ".logs" / "scheduler.log"
    result: dict = {"stages": [], "segments": {}, "seconds": {}}
    for group in _groups(tuple(stages)):
        started = time.perf_counter()
        if not group[0].blockwise:
            (stage,) = group
            stage.drop_artifacts(out, settings)
            result.update(stage.run(out, settings))
            stage.finished(out, settings)
            _check_segments(out, settings, result)
            result["seconds"][stage.name] = time.perf_counter() - started
            continue
        for stage in group:
            stage.drop_artifacts(out, settings)
        tasks = [_task(stage, out, shape, block, stage.context(settings), workers, worker_command, spool)
                 for stage in group]
        pipeline = daisy.Pipeline.from_task(tasks[0])
        for task in tasks[1:]:
            pipeline = pipeline + task
        try:
            result["stages"].extend(_run_pipeline(pipeline, tasks, workers, progress, host, log))
        finally:
            for task in tasks:  # serial runs: close what the in-process block functions opened
                if isinstance(task.process_function, BlockFunction):
                    task.process_function.close()
        for stage in group:
            stage.finished(out, settings)
        result["seconds"]["+".join(stage.name for stage in group)] = time.perf_counter() - started
    result["warnings"] = list(layout.RunSettings.load(out).warnings)
    return result


def _check_segments(out: str, settings: layout.RunSettings, result: dict) -> None:
    """A whole volume in one segment is the typical failure of affinities the model could
    not read (contrast, dtype range): never a quiet success; recorded with the settings."""
    segments = result.get("segments", {}).get(float(settings.threshold))
    if segments is None or segments > 1:
        return
    warning = (f"the segmentation at threshold {settings.threshold:g} is {segments} segment(s) for the whole "
               "volume: the affinities are probably wrong (check the raw's contrast and the model)")
    if warning not in settings.warnings:  # the object the later stages save, so in place
        settings.warnings.append(warning)
        settings.save(out)
