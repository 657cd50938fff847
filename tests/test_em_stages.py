"""The EM stages are declared once (pipelines/em/stages.py) and everything else reads the
table: prepare()'s arrays, the run order, psc-segment --stage, the napari widget's loop,
psc-worker's lookup and the stage table in docs/em.md."""

from __future__ import annotations

import argparse
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zarr

from psc.pipelines.em import layout
from psc.pipelines.em import run as em_run
from psc.pipelines.em import stages as em_stages
from psc.pipelines.em.fragments import ID_BITS, fragment_block, globalise
from psc.pipelines.em.run import STAGE_NAMES, prepare, run
from psc.pipelines.em.stages import STAGES, Array, Stage, stage_named, stage_table
from psc.pipelines.em.volumes import array_names, locate

from em_fixtures import synthetic_raw, tiny_weights

DOC = Path(__file__).resolve().parents[1] / "docs" / "em.md"
BLOCK = (16, 24, 20)


class Census(Stage):
    """A stage added to the table by a test: writes 7 into its own array, block by block."""

    name = "census"
    description = "a test stage that writes 7 into its own array"
    creates = (Array("census", "uint8", channels=2),)
    opened: list[str] = []

    @contextmanager
    def open_worker(self, worker):
        from psc.pipelines.em.volumes import open_volume

        array = open_volume(worker.out, "census", mode="r+")
        Census.opened.append(worker.out)

        def process(read_roi, write_roi):
            array.write(write_roi, np.full((2, *write_roi.shape), 7, np.uint8))

        yield process


@pytest.fixture
def with_census(monkeypatch):
    """The table with one more stage at its end, as if declared in stages.py."""
    table = STAGES + (Census(),)
    names = tuple(stage.name for stage in table)
    for module in (em_stages, em_run):
        monkeypatch.setattr(module, "STAGES", table)
        monkeypatch.setattr(module, "STAGE_NAMES", names)
    Census.opened = []
    return names


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    path, _, _ = synthetic_raw(tmp_path_factory.mktemp("em_stages"))
    return path / "raw"


def _stage_choices() -> tuple[list[str], str]:
    from psc.app.segment_em import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    action = next(a for a in parser._actions if "--stage" in a.option_strings)
    return list(action.choices), action.help


def _declared_arrays(table) -> dict[str, Array]:
    return {array.name: array for stage in table for array in stage.creates}


def test_the_table_is_the_run_order_and_the_public_names():
    assert STAGE_NAMES == tuple(stage.name for stage in STAGES) == ("predict", "fragments", "edges", "merge",
                                                                    "relabel", "downsample")
    em_stages.check_declarations()
    assert [stage.name for stage in STAGES if not stage.blockwise] == ["merge"]
    assert [stage.name for stage in STAGES if stage.with_context] == ["fragments", "edges"]
    # every stage chained, in order, when all run; each on its own otherwise
    assert [[s.name for s in group] for group in em_run._groups(STAGE_NAMES)] == [
        ["predict", "fragments", "edges"], ["merge"], ["relabel", "downsample"]]
    assert [[s.name for s in group] for group in em_run._groups(("relabel", "predict", "fragments"))] == [
        ["predict"], ["fragments"], ["relabel"]]
    assert stage_named("edges") is STAGES[2] and stage_named("nonsense") is None


def test_psc_segment_stage_choices_and_help_come_from_the_table():
    choices, help_text = _stage_choices()
    assert choices == list(STAGE_NAMES)
    for stage in STAGES:
        assert f"{stage.name}: {stage.description}" in help_text


def test_docs_list_the_declared_stages_in_order():
    text = DOC.read_text()
    assert stage_table() in text, "docs/em.md: paste stage_table() into the Stages section"
    section = text.split("## Stages", 1)[1].split("\n## ", 1)[0]
    numbered = re.findall(r"^\d+\. \*\*(\w+)\*\*", section, flags=re.MULTILINE)
    assert tuple(numbered) == STAGE_NAMES


def test_prepare_creates_exactly_the_declared_arrays(raw, tmp_path):
    out = tmp_path / "out.zarr"
    prepare(str(raw), out, tiny_weights(tmp_path), block_size=BLOCK)
    group = zarr.open_group(str(out), mode="r")
    declared = _declared_arrays(STAGES)
    assert set(array_names(group)) == set(declared) == {layout.AFFINITIES, layout.FRAGMENTS, layout.SEGMENTATION}
    shape = zarr.open_array(str(raw), mode="r").shape
    for name, array in declared.items():
        assert group[locate(group, name)].dtype == np.dtype(array.dtype)
        assert group[locate(group, name)].shape == ((array.channels,) if array.channels else ()) + shape


def test_a_stage_added_to_the_table_reaches_every_consumer(with_census, raw, tmp_path, monkeypatch):
    names = with_census
    choices, help_text = _stage_choices()
    assert choices == list(names) and "census: a test stage" in help_text
    assert [[s.name for s in group] for group in em_run._groups(names)][-1] == ["census"]
    assert stage_named("census").name == "census"  # how psc-worker finds a task's stage

    out = tmp_path / "census.zarr"
    prepare(str(raw), out, tiny_weights(tmp_path), block_size=BLOCK)
    group = zarr.open_group(str(out), mode="r")
    assert set(array_names(group)) == set(_declared_arrays(em_stages.STAGES))
    assert group[locate(group, "census")].shape[0] == 2

    report = run(out, workers=0, progress=False, stages=("census",))
    assert [s.task for s in report["stages"]] == ["census"] and report["stages"][0].failed == 0
    assert report["stages"][0].blocks > 1 and Census.opened == [str(out)]  # opened once, for every block
    assert (zarr.open_group(str(out), mode="r")[locate(group, "census")][:] == 7).all()
    assert (out / layout.TRACKING_DIR / "census").exists()

    # the napari widget runs the table's stages, in order
    from psc.plugins.napari import _segment

    called = []
    monkeypatch.setattr(_segment, "is_em_card", lambda card: True)
    monkeypatch.setattr(_segment, "read_card", lambda weights: None)
    monkeypatch.setattr(em_run, "prepare", lambda *args, **kwargs: None)
    monkeypatch.setattr(em_run, "run", lambda out, stages, **kwargs: called.append(stages))
    steps = []
    _segment.segment_em(str(raw), tmp_path / "napari.zarr", tmp_path / "weights.pt", device="cpu",
                        progress=lambda done, total, what: steps.append((done, total, what)))
    assert called == [(name,) for name in names]
    assert [what for _, _, what in steps] == [*names, "done"] and steps[-1][:2] == (len(names), len(names))


def test_the_block_function_pickles_without_its_state(with_census, raw, tmp_path):
    out = tmp_path / "pickle.zarr"
    prepare(str(raw), out, tiny_weights(tmp_path), block_size=BLOCK)
    function = stage_named("census").block_function(out)

    from funlib.geometry import Roi

    class Block:
        read_roi = write_roi = Roi((0, 0, 0), BLOCK)

    function(Block())
    assert function._process is not None
    copy = pickle.loads(pickle.dumps(function))
    assert copy._process is None and copy.out == str(out) and copy.stage.name == "census"
    function.close()
    assert function._process is None


def test_relabel_forgets_its_done_markers_when_the_threshold_changes(tmp_path):
    relabel = stage_named("relabel")
    markers = layout.tracking_path(tmp_path, "relabel")
    settings = layout.RunSettings(raw="r", raw_name=None, weights="w", threshold=0.5)
    for relabelled_at, kept in ((None, True), (0.5, True), (0.3, False)):
        markers.mkdir(parents=True, exist_ok=True)
        settings.extra = {} if relabelled_at is None else {"relabelled_at": relabelled_at}
        relabel.drop_artifacts(str(tmp_path), settings)
        assert markers.exists() == kept, relabelled_at


def test_declarations_are_checked():
    class Orphan(Stage):
        name, description, chains_after = "orphan", "chains after a stage that is not before it", "predict"

        @contextmanager
        def open_worker(self, worker):
            yield lambda read_roi, write_roi: None

    with pytest.raises(ValueError, match="chains after"):
        em_stages.check_declarations(STAGES + (Orphan(),))
    with pytest.raises(ValueError, match="unique"):
        em_stages.check_declarations(STAGES + (STAGES[0],))


def test_fragment_ids_carry_their_block():
    labelled, ids, _ = globalise(np.array([[3, 3, 9]], np.uint64), 5)
    assert fragment_block(int(ids[0])) == 5 and fragment_block(ids[1]) == 5
    np.testing.assert_array_equal(fragment_block(labelled), np.full(labelled.shape, 5, np.uint64))
    assert fragment_block((7 << ID_BITS) | 12) == 7


def _spy_read_rois(monkeypatch, stage_class, seen: list):
    """Record the (read ROI, write ROI) of every block ``stage_class`` processes (serial run)."""
    original = stage_class.open_worker

    @contextmanager
    def spying(self, worker):
        with original(self, worker) as process:
            def recorded(read_roi, write_roi):
                seen.append((read_roi, write_roi))
                process(read_roi, write_roi)

            yield recorded

    monkeypatch.setattr(stage_class, "open_worker", spying)


def test_edges_read_their_own_wider_context(raw, tmp_path, monkeypatch):
    """The edges stage's merge scores depend on whole regions, so it reads
    ``edge_context`` around its block, more than the fragments stage's ``context``."""
    out = tmp_path / "out.zarr"
    settings = prepare(str(raw), out, tiny_weights(tmp_path), block_size=BLOCK)
    assert settings.edge_context == (24, 24, 24) and settings.context == (8, 8, 8)
    edges, fragments = [], []
    _spy_read_rois(monkeypatch, em_stages.Edges, edges)
    _spy_read_rois(monkeypatch, em_stages.Fragments, fragments)
    run(out, workers=0, progress=False)
    from psc.pipelines.em.volumes import open_volume

    shape = open_volume(out, layout.FRAGMENTS).shape
    blocks = int(np.prod([-(-s // b) for s, b in zip(shape, BLOCK)]))
    from funlib.geometry import Coordinate, Roi

    volume = Roi((0, 0, 0), shape)
    for seen, context in ((edges, settings.edge_context), (fragments, settings.context)):
        assert len(seen) == blocks
        for read_roi, write_roi in seen:  # the block grown by the context, inside the volume
            assert read_roi == write_roi.grow(Coordinate(context), Coordinate(context)).intersect(volume)
    assert sum(r.size for r, _ in edges) > sum(r.size for r, _ in fragments)


def test_a_run_from_before_edge_context_keeps_its_context(raw, tmp_path):
    out = tmp_path / "out.zarr"
    weights = tiny_weights(tmp_path)
    prepare(str(raw), out, weights, block_size=BLOCK)
    group = zarr.open_group(str(out), mode="a")
    recorded = dict(group.attrs["psc"])
    del recorded["edge_context"]  # as an older psc wrote it
    group.attrs["psc"] = recorded
    assert layout.RunSettings.load(out).edge_context == (8, 8, 8)
    resumed = prepare(str(raw), out, weights, block_size=BLOCK)  # a resume: no refusal, the old context
    assert resumed.edge_context == (8, 8, 8) and layout.RunSettings.load(out).edge_context == (8, 8, 8)
