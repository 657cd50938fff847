"""An EM run never turns nonsense into a quiet success (issue 14, "Plausible-looking
nonsense"): the raw is scaled by the range its data use, not its dtype's; what is not
an image is refused before any work; what will probably come out wrong warns, and the
warning is recorded with the run's settings."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from psc.app.segment import main as segment_main
from psc.pipelines.em import layout
from psc.pipelines.em.intensity import input_range, measure
from psc.pipelines.em.run import EMRunError, prepare, run
from psc.pipelines.em.volumes import create_volume, open_volume
from psc.utils.errors import InputError

from em_fixtures import synthetic_raw, tiny_weights

SHAPE = (24, 24, 24)
CHUNKS = (12, 12, 12)


@pytest.fixture()
def case(tmp_path):
    raw, image, _ = synthetic_raw(tmp_path, shape=SHAPE, chunks=CHUNKS)
    return tmp_path, raw, image, tiny_weights(tmp_path)


def _write(folder, name, data, dtype):
    path = folder / name
    volume = create_volume(path, "raw", data.shape, dtype, CHUNKS, (8, 8, 8))
    volume.write(volume.roi, data.astype(dtype))
    return path / "raw"


def _run(raw, out, weights, **kw) -> dict:
    prepare(str(raw), out, weights, block_size=(12, 12, 12), workers=1, **kw)
    return run(out, workers=0, progress=False)


def _command(raw, out, weights, *extra) -> list[str]:
    return [str(raw), "-o", str(out), "--weights", str(weights), "--workers", "0", "--device", "cpu",
            "--block-size", "12", "12", "12", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psc-segment: error:"), err
    return err[0]


# --- the range the data use, not the dtype's ----------------------------------------------

def test_input_range_is_the_range_the_bits_use():
    u8, u16, f32 = np.dtype("uint8"), np.dtype("uint16"), np.dtype("float32")
    assert input_range(3, 250, u8) == (0.0, 255.0)  # uint8: exactly the dtype scaling models learned
    assert input_range(0, 255, u16) == (0.0, 255.0)  # uint16 holding 8 bits
    assert input_range(10, 4000, u16) == (0.0, 4095.0)  # a 12-bit detector
    assert input_range(0, 65535, u16) == (0.0, 65535.0)
    assert input_range(0.0, 0.9, f32) == (0.0, 1.0)  # float already in [0, 1]
    assert input_range(0.0, 254.0, f32) == (0.0, 255.0)
    assert input_range(-2.0, 3.0, f32) == (-2.0, 5.0)  # z-scored: its own min and span


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_the_same_image_in_a_wider_dtype_gives_the_same_affinities(case, dtype):
    """uint16 or float32 holding the uint8 values 0..255: before, divided by 65535 (or
    taken as [0, 1]), the network saw a black (or saturated) volume; now it sees what it
    sees for the uint8 volume, so every array of the run is the same."""
    folder, raw, image, weights = case
    _run(raw / "raw", folder / "u8.zarr", weights)
    wide = _write(folder, f"{dtype}.zarr", image, dtype)
    _run(wide, folder / "wide.zarr", weights)
    for name in ("affinities", "fragments", "segmentation"):
        np.testing.assert_array_equal(open_volume(folder / "wide.zarr", name).array[:],
                                      open_volume(folder / "u8.zarr", name).array[:])
    assert layout.RunSettings.load(folder / "wide.zarr").raw_intensity["scale"] == 255.0


def test_twelve_bit_data_reach_the_network_as_eight_bit_data_do(case):
    folder, raw, image, weights = case
    _run(raw / "raw", folder / "u8.zarr", weights)
    _run(_write(folder, "u12.zarr", image.astype(np.uint16) * 16, "uint16"), folder / "u12run.zarr", weights)
    a = open_volume(folder / "u8.zarr", "affinities").array[:].astype(int)
    b = open_volume(folder / "u12run.zarr", "affinities").array[:].astype(int)
    # 16 x / 4095 against x / 255: inputs 0.4 % apart, affinities a few uint8 steps at most
    assert np.abs(a - b).max() <= 4, np.abs(a - b).max()
    settings = layout.RunSettings.load(folder / "u12run.zarr")
    assert settings.raw_intensity["scale"] == 4095.0
    assert not any("span" in w or "distinct" in w for w in settings.warnings)  # an image of full contrast


# --- not an image: refused before any work --------------------------------------------------

@pytest.mark.parametrize("kind", ["zeros", "constant", "labels", "nan"])
def test_what_is_not_an_image_is_refused_before_anything_is_written(case, capsys, kind):
    folder, raw, image, weights = case
    if kind == "zeros":
        bad = _write(folder, "bad.zarr", np.zeros(SHAPE), "uint8")
    elif kind == "constant":
        bad = _write(folder, "bad.zarr", np.full(SHAPE, 0.5), "float32")
    elif kind == "labels":  # the container's own label array given as raw
        bad = raw / "labels"
    else:
        data = image.astype(np.float32) / 255
        data[2, 3, 4] = np.nan  # in the first chunk, which the sample always reads
        bad = _write(folder, "bad.zarr", data, "float32")
    out = folder / "out.zarr"
    assert segment_main(_command(bad, out, weights)) != 0
    line = _one_error_line(capsys)
    assert {"zeros": "constant", "constant": "constant", "labels": "label", "nan": "NaN"}[kind] in line
    assert not out.exists()


def test_nan_the_sample_missed_fails_its_block_with_the_reason(case):
    folder, raw, image, weights = case
    data = image.astype(np.float32) / 255
    shape = (24, 24, 48)  # 8 chunks; 32 sampled chunks would read them all, so sample fewer
    data = np.concatenate([data, data], axis=2)
    data[14, 14, 20] = np.nan
    bad = _write(folder, "bad.zarr", data, "float32")
    import psc.pipelines.em.intensity as intensity

    sampled = intensity.SAMPLED_CHUNKS
    intensity.SAMPLED_CHUNKS = 2  # the first and the last chunk: not the one holding the NaN
    try:
        prepare(str(bad), folder / "out.zarr", weights, block_size=(12, 12, 12), workers=1)
    finally:
        intensity.SAMPLED_CHUNKS = sampled
    assert open_volume(bad).shape == shape
    with pytest.raises((EMRunError, InputError), match="NaN"):  # serial: the block's own error
        run(folder / "out.zarr", workers=0, progress=False)


@pytest.mark.parametrize("threshold", [1.5, -0.1, float("nan")])
def test_a_threshold_that_is_not_an_affinity_is_refused(case, threshold):
    folder, raw, image, weights = case
    with pytest.raises(InputError, match="outside \\[0, 1\\]"):
        prepare(str(raw / "raw"), folder / "out.zarr", weights, threshold=threshold)
    with pytest.raises(InputError, match="outside \\[0, 1\\]"):
        prepare(str(raw / "raw"), folder / "out.zarr", weights, thresholds=(0.5, threshold))
    assert not (folder / "out.zarr").exists()


def test_a_block_larger_than_the_volume_is_shrunk_to_it(case):
    folder, raw, image, weights = case
    settings = prepare(str(raw / "raw"), folder / "out.zarr", weights, block_size=(4096, 4096, 16))
    assert settings.block_size == (24, 24, 16)
    assert open_volume(folder / "out.zarr", "affinities").array.chunks[-3:] == (24, 24, 16)


# --- probably wrong: a warning, recorded -----------------------------------------------------

def test_low_contrast_and_few_values_warn_and_are_recorded(case, capsys):
    folder, raw, image, weights = case
    faint = _write(folder, "faint.zarr", 30000 + image.astype(np.uint16) // 32, "uint16")  # 8 grey levels on a 16-bit pedestal
    record, warnings = measure(open_volume(faint))
    assert record["scale"] == 32767.0
    assert any("span" in w for w in warnings) and any("distinct values" in w for w in warnings)
    out = folder / "out.zarr"
    assert segment_main(_command(faint, out, weights)) == 0
    err = capsys.readouterr().err
    recorded = layout.RunSettings.load(out).warnings
    assert len(recorded) >= 2 and all(w in err for w in recorded)
    assert sum(line.startswith("psc-segment: warning:") for line in err.splitlines()) == len(recorded)


def test_one_segment_for_the_whole_volume_warns(case, capsys):
    folder, raw, image, weights = case
    out = folder / "out.zarr"
    assert segment_main(_command(raw / "raw", out, weights, "--threshold", "1", "--thresholds", "1")) == 0
    err = capsys.readouterr().err
    assert open_volume(out, "segmentation").array[:].max() == 1  # all merged
    recorded = layout.RunSettings.load(out).warnings
    assert any("1 segment(s)" in w for w in recorded) and "1 segment(s)" in err
