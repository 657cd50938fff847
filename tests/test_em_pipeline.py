"""The blockwise EM pipeline on real computations: seamless prediction, waterz edge
scores, global merge, relabel, evaluation, multi-process workers, remote workers by
address, resume after kill -9, failing blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import waterz
import zarr
from funlib.geometry import Roi

from psc.pipelines.em import layout
from psc.pipelines.em.agglomerate import score_edges
from psc.pipelines.em.evaluate import evaluate_run
from psc.pipelines.em.fragments import fragment_block
from psc.pipelines.em.graph import GraphStore, apply_lookup
from psc.pipelines.em.merge import segments_at
from psc.pipelines.em.metrics import evaluate
from psc.pipelines.em.predict import AffinityPredictor
from psc.pipelines.em.run import prepare, run
from psc.pipelines.em.volumes import open_volume

from em_fixtures import synthetic_raw, tiny_weights


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("em")
    raw, _, labels = synthetic_raw(folder)
    return folder, raw, tiny_weights(folder), labels


@pytest.fixture(scope="module")
def serial_run(inputs):
    folder, raw, weights, _ = inputs
    out = folder / "serial.zarr"
    prepare(str(raw / "raw"), out, weights, block_size=(16, 24, 20), workers=1)
    report = run(out, workers=0, progress=False)
    return out, report


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if two labelings group the voxels identically (ids may differ)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def test_blockwise_prediction_equals_whole_volume(inputs):
    _, raw_path, weights, _ = inputs
    predictor = AffinityPredictor(weights)
    raw = open_volume(raw_path, "raw")
    whole = predictor.predict(raw, raw.roi)
    blocks = np.full_like(whole, np.nan)
    for z in range(0, raw.shape[0], 12):
        for y in range(0, raw.shape[1], 20):
            for x in range(0, raw.shape[2], 16):
                roi = Roi((z, y, x), (12, 20, 16)).intersect(raw.roi)
                blocks[(slice(None), *roi.to_slices())] = predictor.predict(raw, roi)
    assert not np.isnan(blocks).any()
    np.testing.assert_allclose(blocks, whole, atol=1e-5)
    assert whole.std() > 1e-3  # the comparison is not between two constant volumes


def test_prediction_refuses_blocks_off_the_pooling_grid(inputs):
    _, raw_path, weights, _ = inputs
    predictor = AffinityPredictor(weights)
    with pytest.raises(ValueError, match="pooling grid"):
        predictor.predict(open_volume(raw_path, "raw"), Roi((2, 0, 0), (8, 8, 8)))


def test_merge_scores_reproduce_waterz_segmentations():
    """Components of edges with merge score <= t equal waterz's own result at t."""
    rng = np.random.default_rng(3)
    fragments = (rng.integers(0, 6, (8, 10, 10)) * 100 + 7).astype(np.uint64)
    fragments[:, :5] += 1  # more, irregular fragments
    affinities = rng.random((3, 8, 10, 10)).astype(np.float32)
    edges = score_edges(affinities, fragments)
    ids = np.unique(fragments)
    u = np.array([e[0] for e in edges], np.uint64)
    v = np.array([e[1] for e in edges], np.uint64)
    merge = np.array([np.inf if e[3] is None else e[3] for e in edges])
    _, local = np.unique(fragments, return_inverse=True)
    local = (local.reshape(fragments.shape) + 1).astype(np.uint64)
    thresholds = [0.3, 0.45, 0.5, 0.55, 0.7]
    reference = [seg.copy() for seg in waterz.agglomerate(affinities, thresholds, fragments=local.copy())]
    for threshold, expected in zip(thresholds, reference):
        mine = apply_lookup(fragments, ids, segments_at(ids, u, v, merge, threshold))
        assert same_partition(mine, expected), threshold
    assert len(np.unique(reference[0])) > len(np.unique(reference[-1])) > 0


def test_serial_run_writes_consistent_arrays_and_graph(serial_run):
    out, report = serial_run
    # predict, fragments, edges, relabel, downsample (merge is global: no blocks)
    assert [s.failed for s in report["stages"]] == [0, 0, 0, 0, 0]
    fragments, segmentation = (open_volume(out, name).array[:] for name in (layout.FRAGMENTS, layout.SEGMENTATION))
    affinities = open_volume(out, layout.AFFINITIES).array
    assert affinities.dtype == np.uint8 and affinities.shape == (3, 40, 56, 48)
    assert fragments.dtype == np.uint64 and 0 not in fragments
    graph = GraphStore(out / layout.GRAPH_FILE)
    ids, segments = graph.lookup(0.5)
    stored = graph.fragment_ids()
    rows = graph.connection.execute("SELECT COUNT(*), COUNT(DISTINCT u || '-' || v) FROM edges").fetchone()
    owners = graph.connection.execute("SELECT u, block FROM edges").fetchall()
    graph.close()
    np.testing.assert_array_equal(np.unique(fragments), stored)
    np.testing.assert_array_equal(segmentation, apply_lookup(fragments, ids, segments))
    labels = np.unique(segmentation)
    np.testing.assert_array_equal(labels, np.arange(1, len(labels) + 1))  # consecutive ids
    assert rows[0] == rows[1] > 0  # each edge stored once
    assert all(fragment_block(u) == block for u, block in owners)  # by the block of its lower fragment
    counts = [report["segments"][t] for t in sorted(report["segments"])]
    assert counts == sorted(counts, reverse=True)  # higher thresholds merge more
    # fragments never cross a block face: every fragment lives in one block
    for fragment in np.unique(fragments)[:50]:
        zs, ys, xs = np.nonzero(fragments == fragment)
        assert len({(z // 16, y // 24, x // 20) for z, y, x in zip(zs, ys, xs)}) == 1


def test_ome_zarr_metadata_of_outputs(serial_run):
    out, _ = serial_run
    group = zarr.open_group(str(out), mode="r")  # each image's group (tests/test_em_ome_zarr.py: the layout)
    entries = {name: group[layout.image_group(name)].attrs["ome"]["multiscales"][0]
               for name in (layout.AFFINITIES, layout.FRAGMENTS, layout.SEGMENTATION)}
    scale = entries["segmentation"]["datasets"][0]["coordinateTransformations"][0]["scale"]
    translation = entries["affinities"]["datasets"][0]["coordinateTransformations"][1]["translation"]
    assert scale == [8.0, 8.0, 8.0] and translation == [0.0, 80.0, 0.0, 16.0]
    assert [a["name"] for a in entries["affinities"]["axes"]] == ["c", "z", "y", "x"]
    assert group[layout.level_path(layout.SEGMENTATION)].metadata.dimension_names == ("z", "y", "x")


def test_evaluate_run_matches_in_memory_scores(serial_run, inputs):
    out, _ = serial_run
    raw_path, labels = inputs[1], inputs[3]
    results = evaluate_run(str(out), str(raw_path / "labels"), progress=False)
    fragments = open_volume(out, layout.FRAGMENTS).array[:]
    graph = GraphStore(out / layout.GRAPH_FILE)
    for threshold in (0.3, 0.5, 0.8):
        ids, segments = graph.lookup(threshold)
        expected = evaluate(apply_lookup(fragments, ids, segments), labels)
        for key, value in expected.items():
            assert results[threshold][key] == pytest.approx(value, abs=1e-9)
    graph.close()


def test_two_worker_processes_give_the_serial_result(serial_run, inputs):
    folder, raw, weights, _ = inputs
    out = folder / "two.zarr"
    prepare(str(raw / "raw"), out, weights, block_size=(16, 24, 20), workers=2)
    run(out, workers=2, progress=False)
    for name in (layout.AFFINITIES, layout.FRAGMENTS, layout.SEGMENTATION):
        np.testing.assert_array_equal(open_volume(serial_run[0], name).array[:], open_volume(out, name).array[:])


def test_remote_workers_connect_by_address(serial_run, inputs):
    """Workers started by a command (as on other machines) join over TCP at 127.0.0.1."""
    folder, raw, weights, _ = inputs
    out = folder / "remote.zarr"
    command = f"{sys.executable} -m psc.app.worker {{out}}"
    prepare(str(raw / "raw"), out, weights, block_size=(16, 24, 20), workers=2)
    run(out, workers=2, worker_command=command, host="127.0.0.1", progress=False)
    expected = open_volume(serial_run[0], layout.SEGMENTATION).array[:]
    np.testing.assert_array_equal(open_volume(out, layout.SEGMENTATION).array[:], expected)


def _segment_command(raw: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "psc.app.segment", str(raw), "-o", str(out), "--weights", str(weights),
            "--block-size", "16", "24", "20", "--device", "cpu", *extra]


def test_resume_after_kill_gives_the_uninterrupted_result(serial_run, inputs):
    folder, raw, weights, _ = inputs
    out = folder / "killed.zarr"
    process = subprocess.Popen(_segment_command(raw / "raw", out, weights, "--workers", "0"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    written = out / layout.level_path(layout.FRAGMENTS) / "c"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if written.exists() and any(p.is_file() for p in written.rglob("*")):
            break  # some blocks are done, others are not
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be killed; make the volume larger"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (zarr.open_group(str(out), mode="r").attrs["psc"].get("extra") or {}).get("relabelled_at")
    finished = subprocess.run(_segment_command(raw / "raw", out, weights, "--workers", "0"),
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert "resuming" in finished.stdout
    for name in (layout.AFFINITIES, layout.FRAGMENTS, layout.SEGMENTATION):
        np.testing.assert_array_equal(open_volume(out, name).array[:], open_volume(serial_run[0], name).array[:])


def test_failing_blocks_are_retried_then_reported(inputs, tmp_path):
    folder, raw, weights, _ = inputs
    broken = tmp_path / "broken.zarr"
    import shutil

    shutil.copytree(raw, broken)
    chunk = next(p for p in sorted((broken / "raw" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(b"not a compressed chunk")
    out = tmp_path / "out.zarr"
    result = subprocess.run(_segment_command(broken / "raw", out, weights, "--workers", "1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("psc-segment: error:")]
    assert len(errors) == 1 and "predict" in errors[0] and "failed" in errors[0]
    assert "Roi" in errors[0] or "[" in errors[0]  # names the failing blocks' regions
    assert "success" not in result.stdout.lower()


def test_em_cli_bad_inputs(inputs, tmp_path):
    folder, raw, weights, _ = inputs
    cases = [
        [str(tmp_path / "missing.zarr"), "-o", str(tmp_path / "a.zarr")],
        [str(raw / "raw"), "-o", str(tmp_path / "not-zarr")],
        [str(raw / "raw"), "-o", str(tmp_path / "b.zarr"), "--block-size", "10", "10", "10"],
    ]

    for argv in cases:
        result = subprocess.run([sys.executable, "-m", "psc.app.segment", *argv, "--weights", str(weights)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0, argv
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("psc-segment: error:"), result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "a.zarr").exists()


def test_psc_eval_scores_a_run_and_a_single_array(serial_run, inputs, capsys):
    from psc.app.evaluate import main as eval_main

    out, _ = serial_run
    labels = inputs[1] / "labels"
    assert eval_main([str(out), str(labels), "--json"]) == 0
    printed = __import__("json").loads(capsys.readouterr().out)
    expected = evaluate_run(str(out), str(labels), progress=False)
    assert set(printed) == {str(t) for t in expected}
    assert printed["0.5"]["voi"] == pytest.approx(expected[0.5]["voi"])
    assert eval_main([str(out / "segmentation"), str(labels), "--json"]) == 0
    single = __import__("json").loads(capsys.readouterr().out)["segmentation"]
    assert single["voi"] == pytest.approx(expected[0.5]["voi"])  # the run was relabelled at 0.5
    assert eval_main([str(out), str(out / "missing.zarr")]) == 2
    assert capsys.readouterr().err.startswith("psc-eval: error:")


def test_qc_picture_shows_the_section(serial_run):
    import matplotlib.image

    from psc.pipelines.em.qc import write_qc

    path = write_qc(serial_run[0])
    picture = matplotlib.image.imread(path)
    assert picture.shape[0] > 200 and picture.shape[1] > 600
    assert picture[..., :3].std() > 0.05  # not a blank canvas
    assert len(np.unique((picture[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 100


def test_default_output_sits_beside_the_input_container():
    from psc.pipelines.em.layout import default_output

    assert default_output(Path("data/fib.zarr")) == Path("data/fib_psc.zarr")
    assert default_output(Path("data/fib.zarr/raw")) == Path("data/fib_psc.zarr")


def test_the_model_is_loaded_once_per_worker_not_per_block(inputs, tmp_path, monkeypatch):
    from psc.pipelines.em import predict

    folder, raw, weights, _ = inputs
    loads = []
    original = predict.AffinityPredictor.__init__

    def counting(self, *args, **kwargs):
        loads.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(predict.AffinityPredictor, "__init__", counting)
    out = tmp_path / "once.zarr"
    prepare(str(raw / "raw"), out, weights, block_size=(16, 24, 20), workers=1)
    report = run(out, workers=0, progress=False, stages=("predict",))
    assert report["stages"][0].blocks > 4 and len(loads) == 1
