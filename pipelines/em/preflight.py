"""What ``psc-segment RAW.zarr -o OUT.zarr`` checks before any work, each a one-line
refusal (``InputError``, exit code 2) instead of a traceback, or worse, a failure that
only shows after the whole run.

- the zarr metadata (``zarr.json``, ``.zarray``, ``.zgroup``, ``.zattrs``) of the raw,
  the containers it sits in, the ground truth and an existing output: a corrupt file
  there gave a ``JSONDecodeError`` traceback from deep inside zarr, or was read as "not a
  psc run";
- ``--threshold`` and ``--thresholds``: affinities, so in [0, 1] (NaN refused);
- ``--gt``: there, a single-channel volume of the raw's shape; it used to be opened
  only when the run was over, so a typo cost the whole run;
- ``--stage``: the stages a subset needs are done (``stages.stages_not_done``).
"""

from __future__ import annotations

import json
from pathlib import Path

from psc.utils.errors import InputError

METADATA_FILES = ("zarr.json", ".zarray", ".zgroup", ".zattrs")


def _containers(path: Path) -> list[Path]:
    """``path`` and the folders above it that are part of the same zarr hierarchy (named
    ``.zarr`` or holding zarr metadata), innermost first."""
    found = [path]
    for parent in path.parents:
        if parent.name.endswith(".zarr") or any((parent / name).is_file() for name in METADATA_FILES):
            found.append(parent)
        else:
            break
    return found


def check_metadata_files(folders, advice: str) -> None:
    """Every zarr metadata file in ``folders`` parses as JSON (an object): else one line
    naming the file and what is wrong with it."""
    for folder in folders:
        for name in METADATA_FILES:
            path = Path(folder) / name
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_bytes())
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise InputError(f"{path}: corrupt zarr metadata ({error}); {advice}") from None
            if not isinstance(data, dict):
                raise InputError(f"{path}: corrupt zarr metadata (not a JSON object); {advice}")


def check_input_metadata(path: str | Path, what: str = "the input") -> None:
    """The metadata of an input array (raw, ground truth) and of the containers above it."""
    path = Path(path)
    if path.exists():
        check_metadata_files(_containers(path), f"{what} is damaged: re-convert it (psc-convert)")


def _zarr_folders(group: Path) -> list[Path]:
    """The folders of the groups and arrays under ``group`` (not hidden), descending into
    groups only: a run's images sit in groups (``labels/fragments/0``, layout.py), and an
    array's chunk folders, which may be millions, are never walked."""
    found = []
    for path in sorted(p for p in group.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.append(path)
        try:
            is_group = json.loads((path / "zarr.json").read_bytes()).get("node_type") == "group"
        except (OSError, ValueError, AttributeError):  # no zarr.json, or a corrupt one (reported by the caller)
            is_group = False
        if is_group:
            found += _zarr_folders(path)
    return found


def check_output_metadata(out: str | Path, force: bool = False) -> None:
    """The metadata of an existing output: the container, its arrays and daisy's done
    markers (``.tracking/<stage>/``), all read when a run resumes. With ``force`` only the
    container's own: ``--force`` removes the run's arrays and markers whatever state
    they are in, but must read the container to know that it holds a psc run."""
    out = Path(out)
    if not out.is_dir():
        return
    check_metadata_files([out], "it cannot be read as a psc run: repair or remove it yourself, or choose another -o")
    if force:
        return
    folders = _zarr_folders(out)
    tracking = out / ".tracking"
    if tracking.is_dir():
        for stage in sorted(p for p in tracking.iterdir() if p.is_dir()):
            folders += [stage, *(p for p in sorted(stage.iterdir()) if p.is_dir())]  # its group, its arrays
    check_metadata_files(folders, "the output is damaged: start over with --force or another -o")


def check_threshold_options(threshold: float | None, thresholds) -> None:
    """``--threshold`` and every ``--thresholds`` value: ``run.check_thresholds``, with the
    option named, before any work."""
    from .run import check_thresholds

    check_thresholds([] if threshold is None else [threshold], "--threshold")
    check_thresholds(thresholds or (), "--thresholds")


def check_gt(gt: str | Path, raw: str | Path) -> None:
    """``--gt`` opens, is one channel and has the raw's shape (what scoring needs), before
    any block is computed."""
    from .volumes import open_volume

    check_input_metadata(gt, "the ground truth")
    try:
        labels = open_volume(gt)
    except InputError as error:
        raise InputError(f"--gt {error}") from None
    if labels.channels:
        raise InputError(f"--gt {gt}: ground truth must be a single-channel 3-D volume, "
                         f"got shape {labels.array.shape}")
    shape = tuple(open_volume(raw).shape)
    if tuple(labels.shape) != shape:
        raise InputError(f"--gt {gt}: its shape {tuple(labels.shape)} is not the raw's {shape}")


def check_stages_ready(out: str | Path, stages, settings) -> None:
    """Refuse ``--stage`` when a stage it needs is not done (``stages.stages_not_done``;
    ``settings`` None: a fresh output, or one that ``--force`` clears)."""
    from .stages import stages_not_done

    missing = stages_not_done(out, tuple(stages), settings)
    if missing:
        where = "nothing has run on a fresh output" if settings is None else f"not done in {out}"
        raise InputError(f"--stage {' '.join(stages)}: needs {', '.join(missing)} first ({where}); "
                         "run those stages too, or leave out --stage")
