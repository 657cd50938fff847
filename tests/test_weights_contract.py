"""Weights carry their contract: the card's kind is checked wherever weights load, the
input normalisation is read from the card by inference (MRI and EM), and the shipped
weights are one registry that every caller uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from funlib.geometry import Roi

from em_fixtures import synthetic_raw, tiny_weights
from mri_fixtures import ThresholdNet, brain_phantom, save_nifti, save_tiny_model, threshold_card
from psc.models.shipped import PRETRAINED_DIR, ShippedWeights, default_weights
from psc.models.weights import (EM_AFFINITY, MRI_TISSUE, ModelCard, WeightsError, card_path, load_weights,
                                read_card)
from psc.pipelines.em import normalise as em_normalise
from psc.pipelines.em.predict import AffinityPredictor
from psc.pipelines.em.volumes import open_volume
from psc.pipelines.inference import InferenceNetwork, load_network, prepare_network
from psc.pipelines.mri import preprocess as mri_preprocess
from psc.pipelines.mri.inference import segment_scan
from psc.pipelines.mri.io import read_scan
from psc.utils.errors import InputError


def test_every_shipped_record_verifies_and_the_first_of_a_kind_is_its_default():
    kinds = set()
    for member in ShippedWeights:
        record = member.value
        card = record.card()  # sha256 and kind checked
        assert card.kind == record.kind and record.path.parent == PRETRAINED_DIR
        if record.kind not in kinds:
            assert default_weights(record.kind) is record
        kinds.add(record.kind)
    assert kinds == {MRI_TISSUE, EM_AFFINITY}
    # the one second model of a kind: the coarse-scan MRI model, which psc-segment picks by voxel size
    assert default_weights(MRI_TISSUE) is ShippedWeights.MRI_TISSUE.value
    assert [m for m in ShippedWeights if m.value.kind == MRI_TISSUE] == [ShippedWeights.MRI_TISSUE,
                                                                          ShippedWeights.MRI_TISSUE_COARSE]
    # the shipped cards say their kind outright, they do not rely on the fallback
    for member in ShippedWeights:
        assert json.loads(card_path(member.value.path).read_text())["kind"] == member.value.kind


def test_a_card_without_a_kind_gets_it_from_its_architecture(tmp_path):
    mri = save_tiny_model(tmp_path / "mri.pt")
    em = tiny_weights(tmp_path)
    for path, kind in ((mri, MRI_TISSUE), (em, EM_AFFINITY)):
        data = json.loads(card_path(path).read_text())
        data.pop("kind", None)
        card_path(path).write_text(json.dumps(data))
        assert read_card(path).kind == kind


def test_weights_of_the_other_kind_are_refused_everywhere(tmp_path):
    mri = save_tiny_model(tmp_path / "mri.pt")
    em = tiny_weights(tmp_path)
    with pytest.raises(WeightsError, match="em-affinity model, not an mri-tissue"):
        load_weights(em, kind=MRI_TISSUE)
    with pytest.raises(WeightsError, match="mri-tissue model, not an em-affinity"):
        read_card(mri, kind=EM_AFFINITY)
    with pytest.raises(WeightsError, match="not an em-affinity"):
        AffinityPredictor(mri)
    with pytest.raises(WeightsError):
        load_network(em, MRI_TISSUE, device="cpu")
    assert issubclass(WeightsError, InputError)  # one line at the command line, never a traceback


def test_a_corrupt_weights_file_is_refused_before_it_is_built(tmp_path):
    em = tiny_weights(tmp_path)
    data = bytearray(em.read_bytes())
    data[len(data) // 2] ^= 0xFF
    em.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        read_card(em, EM_AFFINITY)
    with pytest.raises(WeightsError, match="sha256"):
        AffinityPredictor(em)


def test_weights_that_do_not_fit_their_card_are_one_clear_error(tmp_path):
    path = save_tiny_model(tmp_path / "mri.pt")
    card = read_card(path)
    card.options = {**card.options, "growth_rate": 8}  # another network than the weights'
    card_path(path).write_text(json.dumps({**json.loads(card_path(path).read_text()), "options": card.options}))
    with pytest.raises(WeightsError, match="do not fit"):
        load_weights(path)


def test_mri_inference_normalises_as_the_card_says(tmp_path, monkeypatch):
    image, _ = brain_phantom()
    scan = read_scan(save_nifti(tmp_path / "t1.nii.gz", image, np.eye(4)))
    card = threshold_card((1, 1, 1))
    reference = segment_scan(scan, ThresholdNet(), card, device="cpu", precision="fp32")
    # A transform that flips the sign of the z-score turns the stand-in's WM into GM.
    flipped = lambda image, mask=None: -mri_preprocess.normalise(image, mask)  # noqa: E731
    monkeypatch.setitem(mri_preprocess.NORMALISATIONS, "negated-zscore", flipped)
    card.normalisation = "negated-zscore"
    other = segment_scan(scan, ThresholdNet(), card, device="cpu", precision="fp32")
    brain = reference.labels > 0
    assert (other.labels[brain] != reference.labels[brain]).mean() > 0.9
    card.normalisation = "no-such-transform"
    with pytest.raises(WeightsError, match="no-such-transform"):
        segment_scan(scan, ThresholdNet(), card, device="cpu")


def test_em_prediction_normalises_as_the_card_says(tmp_path, monkeypatch):
    weights = tiny_weights(tmp_path)
    raw_path, _, _ = synthetic_raw(tmp_path)
    raw = open_volume(raw_path, "raw")
    roi = Roi(raw.roi.offset, (16, 16, 16))
    predictor = AffinityPredictor(weights)
    sample = raw.read(roi)
    np.testing.assert_array_equal(predictor.normalise(sample), em_normalise.divide_by_dtype_max(sample))
    reference = predictor.predict(raw, roi)
    seen = []

    def inverted(raw, intensity=None):
        seen.append(raw.shape)
        return 1 - em_normalise.divide_by_dtype_max(raw)

    monkeypatch.setitem(em_normalise.NORMALISATIONS, "inverted", inverted)
    data = json.loads(card_path(weights).read_text())
    card_path(weights).write_text(json.dumps({**data, "normalisation": "inverted"}))
    predictor = AffinityPredictor(weights)
    other = predictor.predict(raw, roi)
    assert seen and seen[0] == tuple(roi.shape + predictor.context * 2)  # the block with its context
    assert not np.array_equal(other, reference)
    card_path(weights).write_text(json.dumps({**data, "normalisation": "no-such-transform"}))
    with pytest.raises(WeightsError, match="no-such-transform"):
        AffinityPredictor(weights)


def test_a_network_prepared_once_serves_many_scans_as_a_fresh_one_would(tmp_path):
    path = save_tiny_model(tmp_path / "mri.pt")
    model, card = load_weights(path, kind=MRI_TISSUE)
    network = prepare_network(model, "cpu", "fp32")
    assert isinstance(network, InferenceNetwork) and network.precision == "fp32"
    assert network.module is not model  # a fused copy: the loaded model is untouched
    for seed in (0, 1):
        image, _ = brain_phantom(seed=seed)
        scan = read_scan(save_nifti(tmp_path / f"t1_{seed}.nii.gz", image, np.eye(4)))
        once = segment_scan(scan, network, card)
        fresh = segment_scan(scan, model, card, device="cpu", precision="fp32")
        np.testing.assert_array_equal(once.labels, fresh.labels)
        np.testing.assert_allclose(once.probabilities, fresh.probabilities, atol=1e-6)


def test_training_validation_runs_the_live_network_through_the_inference_code(tmp_path):
    weights = tiny_weights(tmp_path)
    model, card = load_weights(weights)
    raw_path, _, _ = synthetic_raw(tmp_path)
    raw = open_volume(raw_path, "raw")
    roi = Roi(raw.roi.offset, (16, 16, 16))
    live = AffinityPredictor.from_model(model.eval(), card.normalisation)
    assert live.model is model  # not a copy: validation sees the weights as they are now
    np.testing.assert_allclose(live.predict(raw, roi), AffinityPredictor(weights).predict(raw, roi), atol=1e-5)
    with torch.no_grad():
        model.head.bias.add_(3.0)
    assert not np.allclose(live.predict(raw, roi), AffinityPredictor(weights).predict(raw, roi), atol=1e-3)


def test_an_em_run_verifies_its_weights_before_writing_anything(tmp_path):
    from psc.pipelines.em.run import prepare

    weights = tiny_weights(tmp_path)
    raw_path, _, _ = synthetic_raw(tmp_path)
    out = tmp_path / "out.zarr"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a truncated download
    with pytest.raises(WeightsError, match="sha256"):
        prepare(f"{raw_path}/raw", out, weights, block_size=(16, 16, 16))
    assert not out.exists()
    with pytest.raises(WeightsError, match="not an em-affinity"):
        prepare(f"{raw_path}/raw", out, save_tiny_model(tmp_path / "mri.pt"), block_size=(16, 16, 16))
    assert not out.exists()
    weights.write_bytes(good)
    settings = prepare(f"{raw_path}/raw", out, weights, block_size=(16, 16, 16))
    assert settings.weights_sha256 == read_card(weights).sha256
    # the same path with other weights (retrained in place) is not a resume of this run
    (tmp_path / "other").mkdir()
    other = tiny_weights(tmp_path / "other", seed=5)
    weights.write_bytes(other.read_bytes())
    card_path(weights).write_text(card_path(other).read_text())
    with pytest.raises(InputError, match="other content"):
        prepare(f"{raw_path}/raw", out, weights, block_size=(16, 16, 16))
