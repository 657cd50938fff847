"""An EM run is a transaction (issue 14, "Data loss and silently mixed results"): an output
never overlaps its input, --force removes only what a run wrote, one run per OUT.zarr at
a time, invalidation is recorded before a stage writes, a changed raw or a changed fixed
setting is refused on resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import zarr

from psc.app.segment import main as segment_main
from psc.pipelines.em import layout
from psc.pipelines.em.run import EMRunError, prepare, run
from psc.pipelines.em.volumes import open_volume
from psc.utils.errors import InputError

from em_fixtures import synthetic_raw, tiny_weights

SHAPE = (24, 24, 24)
BLOCK = ("12", "12", "12")
LOW, HIGH = 0.01, 0.99  # thresholds that give different segmentations with the untrained model
LOW_HIGH = (LOW, HIGH)


@pytest.fixture()
def case(tmp_path):
    raw, _, _ = synthetic_raw(tmp_path, shape=SHAPE, chunks=(12, 12, 12))
    return tmp_path, raw, tiny_weights(tmp_path)


def _segment(raw, out, weights, *extra) -> list[str]:
    return [str(raw), "-o", str(out), "--weights", str(weights), "--workers", "0", "--device", "cpu",
            "--block-size", *BLOCK, *extra]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psc-segment: error:"), err
    return err[0]


# --- 1. an output that overlaps the input; what --force removes ---------------------------

@pytest.mark.parametrize("where", ["container", "array", "inside-array", "inside-container"])
@pytest.mark.parametrize("force", [False, True])
def test_an_output_overlapping_the_input_is_refused_and_nothing_is_written(case, capsys, where, force):
    folder, raw, weights = case
    out = {"container": raw, "array": raw / "raw", "inside-array": raw / "raw" / "x.zarr",
           "inside-container": raw / "runs.zarr"}[where]
    before = _snapshot(raw)
    code = segment_main(_segment(raw / "raw", out, weights, *(["--force"] if force else [])))
    assert code != 0
    assert "input" in _one_error_line(capsys)
    assert _snapshot(raw) == before


def test_force_removes_only_what_the_run_wrote(case, capsys):
    folder, raw, weights = case
    out = folder / "out.zarr"
    assert segment_main(_segment(raw / "raw", out, weights)) == 0
    mine = zarr.open_group(str(out), mode="a").create_array("mine", shape=(4, 4, 4), dtype="uint8")
    mine[:] = 7
    (out / "notes.txt").write_text("mine")
    assert segment_main(_segment(raw / "raw", out, weights, "--force")) == 0
    capsys.readouterr()
    group = zarr.open_group(str(out), mode="r")
    assert (group["mine"][:] == 7).all() and (out / "notes.txt").read_text() == "mine"
    assert open_volume(out, layout.SEGMENTATION).array[:].max() > 0 and "psc" in group.attrs


@pytest.mark.parametrize("force", [False, True])
def test_a_container_that_is_not_a_run_is_refused(case, capsys, force):
    folder, raw, weights = case
    other, _, _ = synthetic_raw(folder, shape=(8, 8, 8), name="other.zarr", chunks=(8, 8, 8))
    before = _snapshot(other)
    assert segment_main(_segment(raw / "raw", other, weights, *(["--force"] if force else []))) != 0
    assert "not a psc run" in _one_error_line(capsys)
    assert _snapshot(other) == before


def test_force_takes_an_empty_container(case, capsys):
    folder, raw, weights = case
    empty = folder / "empty.zarr"
    zarr.open_group(str(empty), mode="w")
    assert segment_main(_segment(raw / "raw", empty, weights, "--force")) == 0


# --- 2. the run's lock ---------------------------------------------------------------------

def test_a_second_run_is_refused_while_one_holds_the_lock(case):
    from psc.pipelines.em.lock import run_lock

    folder, raw, weights = case
    out = folder / "out.zarr"
    command = [sys.executable, "-m", "psc.app.segment", *_segment(raw / "raw", out, weights)]
    with run_lock(out):
        refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    err = refused.stderr.strip().splitlines()
    assert len(err) == 1 and f"pid {os.getpid()}" in err[0] and "in use" in err[0], err
    assert not layout.tracking_path(out, "predict").exists()


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    from psc.pipelines.em.lock import run_lock

    out = tmp_path / "out.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom psc.pipelines.em.lock import run_lock\n"
         f"with run_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(InputError, match=f"pid {holder.pid}"):
        with run_lock(out):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with run_lock(out):  # the kernel released it
        pass


# --- 3. invalidation recorded before the stage writes ------------------------------------

def _interrupted_relabel(monkeypatch, out, after_blocks: int) -> None:
    """Run relabel with every block after the first ``after_blocks`` failing: a relabel
    interrupted part-way, some done markers written."""
    from psc.pipelines.em import graph

    real, calls = graph.apply_lookup, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after_blocks:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(graph, "apply_lookup", failing)
    with pytest.raises(EMRunError):
        run(out, workers=0, progress=False, stages=("relabel",))
    monkeypatch.setattr(graph, "apply_lookup", real)


def _expected_segmentation(out, threshold: float) -> np.ndarray:
    from psc.pipelines.em.graph import GraphStore, apply_lookup

    store = GraphStore(layout.graph_path(out))
    try:
        ids, segments = store.lookup(threshold)
    finally:
        store.close()
    return apply_lookup(open_volume(out, layout.FRAGMENTS).array[:], ids, segments)


@pytest.mark.parametrize("order", ["finished-then-interrupted", "interrupted-first"])
def test_an_interrupted_relabel_and_another_threshold_never_mix(case, monkeypatch, order):
    folder, raw, weights = case
    out = str(folder / "out.zarr")
    block = tuple(int(b) for b in BLOCK)
    prepare(str(raw / "raw"), out, weights, block_size=block, thresholds=LOW_HIGH, threshold=HIGH)
    run(out, workers=0, progress=False, stages=("predict", "fragments", "edges", "merge"))
    if order == "finished-then-interrupted":
        run(out, workers=0, progress=False, stages=("relabel",))  # complete at 0.5
        prepare(str(raw / "raw"), out, weights, block_size=block, thresholds=LOW_HIGH, threshold=LOW)
        _interrupted_relabel(monkeypatch, out, 3)  # some blocks at LOW
        final = HIGH
    else:
        _interrupted_relabel(monkeypatch, out, 3)  # a first relabel, at HIGH, interrupted
        final = LOW
    assert not np.array_equal(_expected_segmentation(out, LOW), _expected_segmentation(out, HIGH)), \
        "the thresholds give the same segmentation: the test proves nothing"
    prepare(str(raw / "raw"), out, weights, block_size=block, thresholds=LOW_HIGH, threshold=final)
    run(out, workers=0, progress=False, stages=("relabel",))
    np.testing.assert_array_equal(open_volume(out, layout.SEGMENTATION).array[:],
                                  _expected_segmentation(out, final))


# --- 4. the raw's fingerprint ----------------------------------------------------------------

def test_a_changed_raw_at_the_same_path_is_refused_on_resume(case, capsys):
    folder, raw, weights = case
    out = folder / "out.zarr"
    prepare(str(raw / "raw"), out, weights, block_size=(12, 12, 12))
    prepare(str(raw / "raw"), out, weights, block_size=(12, 12, 12))  # unchanged: a resume
    array = zarr.open_group(str(raw), mode="a")["raw"]
    array[:] = 255 - array[:]  # re-converted: same path, shape, dtype, chunks; other content
    with pytest.raises(InputError, match="changed"):
        prepare(str(raw / "raw"), out, weights, block_size=(12, 12, 12))
    assert segment_main(_segment(raw / "raw", out, weights)) != 0
    assert "--force" in _one_error_line(capsys)


# --- 5. settings: fixed or invalidating, one table -------------------------------------------

def test_every_setting_has_a_declared_rule():
    assert set(layout.SETTING_RULES) == {field.name for field in fields(layout.RunSettings)}
    stages = {rule.invalidates for rule in layout.SETTING_RULES.values() if rule.invalidates}
    from psc.pipelines.em.stages import STAGE_NAMES

    assert stages <= set(STAGE_NAMES)


@pytest.mark.parametrize("change", [{"precision": "bf16"}, {"device": "meta"}])
def test_a_resume_with_another_fixed_setting_is_refused(case, change):
    folder, raw, weights = case
    out = folder / "out.zarr"
    prepare(str(raw / "raw"), out, weights, block_size=(12, 12, 12), precision="fp32", device="cpu")
    arguments = dict(block_size=(12, 12, 12), precision="fp32", device="cpu") | change
    with pytest.raises(InputError, match=f"{next(iter(change))}.*--force"):
        prepare(str(raw / "raw"), out, weights, **arguments)
    assert layout.RunSettings.load(out).precision == "fp32"


def test_the_napari_overwrite_is_force_not_a_blanket_delete(tmp_path):
    """The Segment widget's "overwrite" for EM goes through prepare(force=True): a folder
    that is not a psc run is refused and its files stay."""
    from psc.models.shipped import ShippedWeights
    from psc.plugins.napari._segment import segment_em

    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("someone's data")
    data = np.zeros((16, 16, 16), np.uint8)
    with pytest.raises(InputError):
        segment_em(None, foreign, ShippedWeights.EM_AFFINITY.value.path, "cpu", data=data, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "someone's data"
