"""Brain extraction and plausibility: is_skull_stripped on stripped and unstripped scans
(real ones where ../shared/data has them, synthetic heads and brains always), deepbet's
mask on the input grid, and psc-segment's warnings, sidecar and brain mask."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest

from display import needs_display
from mri_fixtures import brain_phantom, oblique_affine, save_nifti, save_tiny_model
from psc.pipelines.mri.brain import BrainExtractor, BrainStage, decide, is_skull_stripped
from psc.pipelines.mri.config import LABELS
from psc.pipelines.mri.io import Scan, read_scan
from psc.pipelines.mri.metrics import dice_per_class
from psc.pipelines.mri.outputs import is_output
from psc.pipelines.mri.plausibility import check
from psc.utils.errors import InputError


def dice(a, b) -> float:
    """Dice of two masks, with the pipeline's own Dice (metrics.dice_per_class)."""
    return dice_per_class(np.asarray(a) > 0, np.asarray(b) > 0, [True])[True]

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MRTRIX = DATA / "mrtrix-sub01"
IBSR = sorted(glob.glob(str(DATA / "ibsr18" / "IBSR_*" / "IBSR_??.nii.gz")))
needs_mrtrix = pytest.mark.skipif(not (MRTRIX / "sub-01_T1w.nii.gz").is_file(), reason="no ../shared/data/mrtrix-sub01")
needs_ibsr = pytest.mark.skipif(not IBSR, reason="no ../shared/data/ibsr18")


def head_phantom(shape=(48, 56, 52), seed=0, air_noise=True) -> np.ndarray:
    """A brain phantom inside a bright scalp/skull shell, in noisy air (a skull-on T1)."""
    rng = np.random.default_rng(seed)
    brain, _ = brain_phantom(tuple(int(s * 0.7) for s in shape), seed)
    image = np.zeros(shape, np.float32)
    start = [(s - b) // 2 for s, b in zip(shape, brain.shape)]
    image[tuple(slice(a, a + b) for a, b in zip(start, brain.shape))] = brain
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    image[(radius < 0.8) & (image == 0)] = 25  # skull and CSF: dark, not black
    image[(radius > 0.8) & (radius < 0.95)] = 220  # scalp fat: bright on T1
    if air_noise:
        image += np.abs(rng.normal(0, 6, shape))  # Rician-like background noise
    return image


def scan_of(array, zooms=(1.0, 1.0, 1.0), affine=None) -> Scan:
    return Scan(Path("x.nii.gz"), np.asarray(array), np.diag([*zooms, 1.0]) if affine is None else affine)


# --- is_skull_stripped -------------------------------------------------------------------

def test_synthetic_brain_is_stripped_and_synthetic_heads_are_not():
    image, _ = brain_phantom()
    stripped, reason = is_skull_stripped(scan_of(image, affine=oblique_affine()))
    assert stripped and "skull-stripped" in reason
    stripped, reason = is_skull_stripped(scan_of(head_phantom()))
    assert not stripped and "background" in reason
    # Air zeroed (some converters do that), but 4 mm voxels make the head 4 L: not a brain.
    stripped, reason = is_skull_stripped(scan_of(head_phantom(air_noise=False), zooms=(4.0, 4.0, 4.0)))
    assert not stripped and " L" in reason


def test_a_bright_shell_left_around_a_stripped_brain_is_not_taken_as_stripped():
    """Fat or skull a stripping tool left around the brain: a constant background, a
    brain-sized region, but a shell far brighter than any brain tissue."""
    from scipy import ndimage

    image, truth = brain_phantom((48, 44, 46))
    brain = truth > 0
    assert is_skull_stripped(scan_of(image))[0]
    shell = ndimage.binary_dilation(brain, iterations=3) & ~ndimage.binary_dilation(brain, iterations=1)
    shelled = image.copy()
    shelled[shell] = 3 * image[brain].max()
    stripped, reason = is_skull_stripped(scan_of(shelled))
    assert not stripped and "brighter than" in reason
    assert is_skull_stripped(scan_of(image.astype(np.float32) - 120))[0]  # already z-scored-like: not judged


def test_bundled_sample_is_stripped():
    from psc.pipelines.mri.sample import sample_t1_path

    assert is_skull_stripped(read_scan(sample_t1_path()))[0]


@needs_ibsr
@pytest.mark.parametrize("index", range(11))
def test_ibsr_is_stripped(index):
    stripped, reason = is_skull_stripped(read_scan(IBSR[index]))
    assert stripped, reason


@needs_mrtrix
def test_mrtrix_head_is_not_stripped():
    stripped, reason = is_skull_stripped(read_scan(MRTRIX / "sub-01_T1w.nii.gz"))
    assert not stripped and "background" in reason


def test_decide_modes_and_a_given_mask_overrides_them():
    head, (brain, _) = scan_of(head_phantom()), brain_phantom()
    assert decide(head, "auto").extract and not decide(scan_of(brain), "auto").extract
    assert decide(scan_of(brain), "on").extract and not decide(head, "off").extract
    assert all(not decide(head, mode, mask_given=True).extract for mode in ("auto", "on", "off"))
    with pytest.raises(InputError, match="--skull-strip"):
        decide(head, "maybe")
    with pytest.raises(InputError, match="--skull-strip"):
        BrainStage("sometimes")
    assert not BrainStage("off").may_extract and BrainStage("auto").may_extract
    assert not BrainStage("on", mask=scan_of(brain)).may_extract


def test_a_stripped_scan_with_a_nonzero_background_is_segmented_inside_its_brain_only():
    """A stripping tool that fills the background with -100 (not 0): auto takes the scan
    as stripped, and its brain is the non-background, not "the nonzero voxels" (which
    would be the whole field of view, -100 z-scored as tissue)."""
    from mri_fixtures import ThresholdNet, threshold_card
    from psc.pipelines.mri.inference import segment_scan

    image, truth = brain_phantom()
    shifted = np.where(truth > 0, image.astype(np.float32), -100.0)
    scan = scan_of(shifted)
    step = BrainStage("auto")(scan)
    assert not step.extracted and "(-100)" in step.decision.reason
    np.testing.assert_array_equal(step.mask.array > 0, shifted != -100)
    seg = segment_scan(scan, ThresholdNet(), threshold_card(), device="cpu", mask=step.mask)
    assert not seg.labels[truth == 0].any()
    plain = segment_scan(scan_of(np.where(truth > 0, image, 0)), ThresholdNet(), threshold_card(), device="cpu")
    # About the same as with a 0 background (the edge voxels, blended with -100 in model
    # space, may differ).
    agreement = dice_per_class(seg.labels, plain.labels, (2, 3))
    assert min(agreement.values()) > 0.95, agreement
    assert BrainStage("auto")(scan_of(np.where(truth > 0, image, 0))).mask is None  # 0: unchanged path


def test_brain_mask_is_an_output_not_a_scan(tmp_path):
    assert is_output(tmp_path / "sub-01_T1w_desc-brain_mask.nii.gz")
    assert not is_output(tmp_path / "sub-01_T1w.nii.gz")


# --- BrainExtractor ----------------------------------------------------------------------

class _RightHalf:
    """A stand-in for deepbet: 'brain' where the RAS-canonical array is nonzero and on
    the right half (x index above the middle); tests the round trip to the input grid."""

    def __init__(self):
        self.model = self.bbox_model = None
        self.bbox = None

    def run_model(self, x):
        prob = (x > 0).astype(np.float32)
        prob[: x.shape[0] // 2 + 1] = 0
        return prob

    def postprocess(self, mask, n_dilate=0):
        return mask


def test_mask_comes_back_on_the_input_grid_whatever_the_orientation():
    image, _ = brain_phantom((20, 24, 22))
    affine = np.array([[0, 0, -1.2, 30], [-1.0, 0, 0, 10], [0, 1.1, 0, -5], [0, 0, 0, 1]])  # permuted, flipped
    extractor = object.__new__(BrainExtractor)
    extractor.bet, extractor.resample = _RightHalf(), False
    brain = extractor.extract(scan_of(image, affine=affine))
    assert brain.mask.shape == image.shape and brain.mask.dtype == bool
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape], indexing="ij"), -1)
    world_x = ijk @ affine[0, :3] + affine[0, 3]
    ras_x = (world_x - world_x.min()) / 1.2  # the RAS x index (voxel size 1.2 on that axis)
    expected = (image > 0) & (ras_x > image.shape[2] // 2 + 0.5)
    np.testing.assert_array_equal(brain.mask, expected)


@pytest.fixture(scope="module")
def extractor():
    return BrainExtractor("cpu")


def test_degenerate_input_is_one_input_error(extractor):
    with pytest.raises(InputError, match="brain extraction failed"):
        extractor.extract(scan_of(np.full((24, 24, 24), 7.0, np.float32)))


@needs_mrtrix
def test_deepbet_finds_the_mrtrix_brain(extractor):
    scan = read_scan(MRTRIX / "sub-01_T1w.nii.gz")
    truth = read_scan(MRTRIX / "sub-01_brainmask.nii.gz").array
    brain = extractor.extract(scan)
    assert brain.mask.shape == scan.array.shape
    assert dice(brain.mask, truth) > 0.95  # measured 0.969 (docs/mri.md)
    warnings = check(np.zeros(scan.array.shape, np.uint8), dict(LABELS), scan.voxel_volume, brain.mask)
    assert not any("brain mask" in w for w in warnings)  # an adult intracranial volume
    litres = brain.voxels * scan.voxel_volume / 1e6
    assert 1.0 < litres < 2.1


# --- plausibility ------------------------------------------------------------------------

def adult_labels(gm_l=0.7, wm_l=0.5, csf_ml=15.0, shape=(180, 180, 180)):
    """A 1 mm label map with the given GM and WM litres and CSF millilitres, well inside
    the grid."""
    labels = np.zeros(shape, np.uint8)
    inner = labels[20:-20, 20:-20, 20:-20].copy().reshape(-1)
    gm, wm, csf = int(gm_l * 1e6), int(wm_l * 1e6), int(csf_ml * 1e3)
    inner[:gm] = 2
    inner[gm:gm + wm] = 3
    inner[gm + wm:gm + wm + csf] = 1
    labels[20:-20, 20:-20, 20:-20] = inner.reshape([s - 40 for s in shape])
    return labels


def test_plausible_adult_volumes_do_not_warn():
    labels = adult_labels()
    assert check(labels, dict(LABELS), 1.0) == []
    brain = np.zeros(labels.shape, bool)
    brain[10:-10, 10:-10, 10:-10] = True  # 4.1 L: too big
    assert any("brain mask is 4.10 L" in w for w in check(labels, dict(LABELS), 1.0, brain))


def test_implausible_volumes_warn():
    names = dict(LABELS)
    assert any("GM+WM is 2.40 L" in w for w in check(adult_labels(1.4, 1.0), names, 1.0))
    assert any("GM+WM is 0.40 L" in w for w in check(adult_labels(0.2, 0.2), names, 1.0))
    assert any("GM/WM ratio is 3.00" in w for w in check(adult_labels(0.9, 0.3), names, 1.0))
    full = np.full((40, 40, 40), 2, np.uint8)
    assert any("image border" in w for w in check(full, names, 1.0))
    # The ventricles missed (the shipped model on 3 mm scans: 1-4 ml).
    assert any("CSF is 2.0 ml" in w for w in check(adult_labels(csf_ml=2.0), names, 1.0))
    assert check(adult_labels(csf_ml=8.8), names, 1.0) == []  # IBSR_03's manual CSF
    # IBSR_16's manual labels have a GM/WM ratio of 2.25: a real brain, no warning.
    assert check(adult_labels(1.0, 0.444), names, 1.0) == []


def test_coarse_voxels_warn_whatever_the_volumes():
    labels, names = adult_labels(), dict(LABELS)
    assert check(labels, names, 1.0, voxel_sizes=(1.8, 1.875, 1.875)) == []  # mrtrix-sub01
    assert check(labels, names, 1.0, voxel_sizes=(2.0, 2.0, 2.0)) == []
    for sizes, shown in (((3.0, 3.0, 3.0), "3 x 3 x 3 mm"), ((1.0, 1.0, 5.0), "1 x 1 x 5 mm")):
        warnings = check(labels, names, 1.0, voxel_sizes=sizes)
        assert len(warnings) == 1 and shown in warnings[0] and "coarser" in warnings[0]


# --- psc-segment -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("weights") / "tiny.pt")


def test_whole_head_with_skull_strip_off_warns_and_the_sidecar_says_so(weights, tmp_path, capsys):
    from psc.app.segment import main

    scan = save_nifti(tmp_path / "head.nii.gz", head_phantom(), np.diag([1.5, 1.5, 1.5, 1.0]))
    assert main([str(scan), "--weights", str(weights), "-o", str(tmp_path / "out"), "--skull-strip", "off"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("psc-segment: warning: head.nii.gz: ") for line in err)
    assert any("GM+WM" in line or "image border" in line for line in err)
    sidecar = json.loads((tmp_path / "out" / "head_dseg.json").read_text())
    assert sidecar["GeneratedBy"][0]["Name"] == "psc"
    assert sidecar["SkullStrip"]["Mode"] == "off" and not sidecar["SkullStrip"]["Extracted"]
    assert sidecar["Warnings"] and len(sidecar["Warnings"]) == len(err)
    assert sidecar["Options"]["skull_strip"] == "off" and len(sidecar["Weights"]["SHA256"]) == 64
    assert not (tmp_path / "out" / "head_desc-brain_mask.nii.gz").exists()


def test_stripped_scan_auto_writes_no_mask_and_a_given_mask_adds_the_brain_row(weights, tmp_path, capsys):
    from psc.app.segment import main

    image, _ = brain_phantom()
    scan = save_nifti(tmp_path / "sub.nii.gz", image, oblique_affine())
    assert main([str(scan), "--weights", str(weights), "-o", str(tmp_path / "a")]) == 0
    sidecar = json.loads((tmp_path / "a" / "sub_dseg.json").read_text())
    assert sidecar["SkullStrip"]["Mode"] == "auto" and not sidecar["SkullStrip"]["Extracted"]
    assert "skull-stripped" in sidecar["SkullStrip"]["Reason"]
    assert "no brain extraction" in capsys.readouterr().out
    assert not (tmp_path / "a" / "sub_desc-brain_mask.nii.gz").exists()
    assert "brain" not in (tmp_path / "a" / "sub_volumes.tsv").read_text()

    mask = save_nifti(tmp_path / "mask.nii.gz", (image > 0).astype(np.uint8), oblique_affine())
    assert main([str(scan), "--weights", str(weights), "-o", str(tmp_path / "b"), "--mask", str(mask),
                 "--skull-strip", "on"]) == 0
    assert json.loads((tmp_path / "b" / "sub_dseg.json").read_text())["SkullStrip"]["Mode"] == "mask"
    assert not (tmp_path / "b" / "sub_desc-brain_mask.nii.gz").exists()  # the user's own mask: not copied
    last = (tmp_path / "b" / "sub_volumes.tsv").read_text().splitlines()[-1].split("\t")
    assert last[:3] == ["n/a", "brain", str(int((image > 0).sum()))]


@needs_mrtrix
def test_mrtrix_auto_extracts_the_brain(weights, tmp_path, capsys):
    from psc.app.segment import main

    out = tmp_path / "out"
    assert main([str(MRTRIX / "sub-01_T1w.nii.gz"), "--weights", str(weights), "-o", str(out)]) == 0
    assert "brain extracted (deepbet" in capsys.readouterr().out
    mask = read_scan(out / "sub-01_T1w_desc-brain_mask.nii.gz")
    truth = read_scan(MRTRIX / "sub-01_brainmask.nii.gz")
    np.testing.assert_allclose(mask.affine, truth.affine, atol=1e-5)
    assert dice(mask.array, truth.array) > 0.95
    dseg = read_scan(out / "sub-01_T1w_dseg.nii.gz", allow_empty=True).array
    assert not np.any(dseg[mask.array == 0])  # nothing labelled outside the brain
    sidecar = json.loads((out / "sub-01_T1w_dseg.json").read_text())
    assert sidecar["SkullStrip"]["Extracted"] and sidecar["SkullStrip"]["Mode"] == "auto"
    assert (out / "sub-01_T1w_volumes.tsv").read_text().splitlines()[-1].split("\t")[1] == "brain"


# --- napari ------------------------------------------------------------------------------

def test_segment_mri_takes_the_skull_strip_choice(weights):
    from psc.models.weights import load_weights
    from psc.pipelines.mri.inference import segment_scan
    from psc.plugins.napari._segment import segment_mri

    image, _ = brain_phantom()
    labels, names, brain, warnings = segment_mri(image, oblique_affine(), weights, "cpu", skull_strip="auto")
    assert brain is None and names == dict(LABELS)  # a stripped image: nothing extracted
    # The phantom is 40 ml, not an adult brain: the widget warns as psc-segment does.
    assert any("GM+WM" in w for w in warnings) or any("no WM" in w for w in warnings), warnings
    model, card = load_weights(weights)
    expected = segment_scan(Scan(Path("x"), image, oblique_affine()), model, card, device="cpu").labels
    np.testing.assert_array_equal(labels, expected)
    with pytest.raises(InputError, match="--skull-strip"):
        segment_mri(image, oblique_affine(), weights, "cpu", skull_strip="sometimes")
    with pytest.raises(InputError, match="NaN"):
        segment_mri(np.where(image > 100, np.nan, image.astype(np.float32)), oblique_affine(), weights, "cpu")


@needs_mrtrix
@needs_display
def test_segment_widget_offers_skull_strip_and_adds_the_mask(make_napari_viewer, qtbot, weights):
    pytest.importorskip("napari")
    from test_napari_widgets import TIMEOUT_MS
    from psc.plugins.napari._widgets import EM, MRI, SegmentWidget

    scan = read_scan(MRTRIX / "sub-01_T1w.nii.gz")
    viewer = make_napari_viewer()
    viewer.add_image(scan.array, name="head", scale=(1.8, 1.875, 1.875))
    widget = SegmentWidget(viewer)
    assert list(widget.skull_strip.choices) == ["auto", "on", "off"] and widget.skull_strip.value == "auto"
    widget.pipeline.value = EM
    assert widget.skull_strip.native.isHidden()  # MRI only
    widget.pipeline.value = MRI
    assert not widget.skull_strip.native.isHidden()
    widget.weights.value = weights
    widget.device.value = "cpu"
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None and "head dseg" in [lyr.name for lyr in viewer.layers],
                    timeout=TIMEOUT_MS)
    mask = next(lyr for lyr in viewer.layers if lyr.name == "head brain mask").data
    truth = read_scan(MRTRIX / "sub-01_brainmask.nii.gz").array
    assert mask.shape == scan.array.shape and dice(mask, truth) > 0.95
    dseg = next(lyr for lyr in viewer.layers if lyr.name == "head dseg").data
    assert not np.any(dseg[mask == 0]) and "brain extracted" in widget.status.value
