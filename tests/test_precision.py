"""Lower precision must keep the answer: the shipped models in bf16 (CPUs with native
bf16) and fp16/bf16 (CUDA) against fp32, on the bundled MNI152 T1 and on synthetic EM
cells. The issue's bar: MRI labels equal on >= 99.9 % of the brain's voxels, EM
variation of information within 1 %."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from psc.models.shipped import ShippedWeights

DEFAULT_WEIGHTS = ShippedWeights.MRI_TISSUE.value.path
DEFAULT_EM_WEIGHTS = ShippedWeights.EM_AFFINITY.value.path
from psc.models.weights import load_weights
from psc.utils.errors import InputError
from psc.pipelines.mri.inference import segment_scan
from psc.pipelines.mri.io import read_scan
from psc.pipelines.mri.sample import sample_t1_path
from psc.pipelines.precision import autocast, cpu_has_native_bf16, resolve_precision

needs_cpu_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="CPU has neither AVX512-BF16 nor AMX")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_precision_follows_the_hardware():
    assert resolve_precision("auto", "cuda") == torch.float16
    assert resolve_precision("auto", "cpu") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_precision("fp32", "cuda") == torch.float32
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(InputError, match="unknown precision"):
        resolve_precision("int8", "cpu")


def test_autocast_runs_convolutions_in_the_chosen_dtype():
    conv = torch.nn.Conv3d(2, 3, 3)
    x = torch.randn(1, 2, 5, 5, 5)
    with autocast("cpu", torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    with autocast("cpu", torch.float32):
        assert conv(x).dtype == torch.float32


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="oneDNN has no bf16 kernels on this CPU (needs AVX512 or AVX-NE-CONVERT): bf16 runs "
                    "through the emulating ordinary ops, whose layout is not what this guards")
def test_densenet_runs_in_bf16_and_channels_last_after_its_fp32_first_convolution():
    """Under bf16 autocast every layer of the dense blocks and transitions must see
    bf16 channels_last input (the first convolution and the head stay in fp32 on
    purpose). A one-channel input is ambiguous between the two layouts, and the first
    convolution's fp32 output once made the whole first dense block run contiguous and
    in fp32 (1.4x slower): this would catch that again."""
    from psc.models.fusion import BatchNormReLU3d, ConvReLU3d, fuse_for_inference

    model, card = load_weights(DEFAULT_WEIGHTS)
    model = fuse_for_inference(model).to(memory_format=torch.channels_last_3d)
    seen = {}

    def record(name):
        def hook(module, inputs):
            seen[name] = (inputs[0].dtype, inputs[0].is_contiguous(memory_format=torch.channels_last_3d))
        return hook

    for name, module in model.named_modules():
        if name.startswith(("blocks.", "transitions.")) and isinstance(module, (ConvReLU3d, BatchNormReLU3d,
                                                                                 torch.nn.Conv3d)):
            module.register_forward_pre_hook(record(name))
    x = torch.randn(1, 1, 40, 40, 40).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode(), autocast("cpu", torch.bfloat16):
        model(x)
    assert len(seen) > 20
    wrong = {name: got for name, got in seen.items() if got != (torch.bfloat16, True)}
    assert not wrong, wrong


def test_max_pooling_stays_in_bf16_and_is_exact():
    """Autocast would pool in fp32; a maximum rounds nothing, so psc pools in the input's
    dtype, and the values are the same."""
    from psc.models.layers import MaxPool3d

    x = torch.randn(1, 6, 8, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    with autocast("cpu", torch.bfloat16):
        pooled = MaxPool3d(2)(x)
    assert pooled.dtype == torch.bfloat16
    assert torch.equal(pooled.float(), torch.nn.functional.max_pool3d(x.float(), 2))


@lru_cache(maxsize=None)
def mri_labels(device: str, precision: str) -> np.ndarray:
    model, card = load_weights(DEFAULT_WEIGHTS)
    scan = read_scan(sample_t1_path())
    return segment_scan(scan, model, card, device=device, precision=precision).labels


def assert_mri_agrees(labels: np.ndarray, reference: np.ndarray) -> None:
    brain = read_scan(sample_t1_path()).array != 0
    agreement = (labels[brain] == reference[brain]).mean()
    assert agreement >= 0.999, f"labels agree on {agreement:.5f} of brain voxels"
    assert {1, 2, 3} <= set(np.unique(labels[brain]).tolist())  # every tissue found


@needs_cpu_bf16
def test_mri_bf16_on_cpu_keeps_the_labels():
    assert_mri_agrees(mri_labels("cpu", "bf16"), mri_labels("cpu", "fp32"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mri_mixed_precision_on_cuda_keeps_the_labels(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    assert_mri_agrees(mri_labels("cuda", precision), mri_labels("cpu", "fp32"))


@pytest.mark.gpu
@needs_cuda
def test_large_input_is_stitched_in_cpu_memory(tmp_path, monkeypatch):
    """Tiled windows run on the GPU, the blended volume stays on the CPU: the GPU's
    peak stays far below what the stitched probabilities of the crop alone take."""
    from mri_fixtures import brain_phantom, save_nifti, save_tiny_model
    from psc.pipelines.mri import config

    image, _ = brain_phantom((256, 240, 256))
    scan = read_scan(save_nifti(tmp_path / "big.nii.gz", image, np.diag([1.0, 1.5, 1.0, 1.0])))
    model, card = load_weights(save_tiny_model(tmp_path / "tiny.pt"))
    monkeypatch.setattr(config, "WHOLE_WINDOW_MAX_VOXELS", 64**3)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    gpu = segment_scan(scan, model, card, device="cuda", precision="fp32", window=(64, 64, 64))
    peak = torch.cuda.max_memory_allocated() - before
    stitched = card.out_channels * image.size * 4  # float32 probabilities, input grid
    assert gpu.windows > 8
    assert peak < stitched / 4, (peak, stitched)
    cpu = segment_scan(scan, model, card, device="cpu", precision="fp32", window=(64, 64, 64))
    assert (gpu.labels == cpu.labels).mean() >= 0.999


@lru_cache(maxsize=None)
def em_vi(tmp_root: str, device: str, precision: str) -> float:
    """Best VI over thresholds of the full blockwise EM pipeline with the shipped model."""
    from pathlib import Path

    from psc.pipelines.em.evaluate import evaluate_run
    from psc.pipelines.em.run import prepare, run
    from psc.pipelines.em.synthetic import make_em_volume
    from psc.pipelines.em.volumes import create_volume

    folder = Path(tmp_root)
    container = folder / "raw.zarr"
    if not container.exists():
        raw, labels = make_em_volume((48, 64, 64), cell_size=24, seed=3)
        for name, data in (("raw", raw), ("labels", labels.astype(np.uint64))):
            volume = create_volume(container, name, data.shape, data.dtype, (32, 32, 32), (8, 8, 8))
            volume.write(volume.roi, data)
    out = folder / f"out-{device}-{precision}.zarr"
    prepare(str(container / "raw"), out, DEFAULT_EM_WEIGHTS, block_size=(32, 32, 32), device=device,
            precision=precision)
    run(out, workers=0, progress=False)
    results = evaluate_run(str(out), str(container / "labels"), progress=False)
    return min(row["voi"] for row in results.values())


@pytest.fixture(scope="module")
def em_folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("em_precision"))


@needs_cpu_bf16
def test_em_bf16_on_cpu_keeps_the_vi(em_folder):
    fp32, bf16 = em_vi(em_folder, "cpu", "fp32"), em_vi(em_folder, "cpu", "bf16")
    assert abs(bf16 - fp32) <= 0.01 * fp32 + 1e-9, (bf16, fp32)


@pytest.mark.gpu
@needs_cuda
def test_em_fp16_on_cuda_keeps_the_vi(em_folder):
    fp32, fp16 = em_vi(em_folder, "cpu", "fp32"), em_vi(em_folder, "cuda", "fp16")
    assert abs(fp16 - fp32) <= 0.01 * fp32 + 1e-9, (fp16, fp32)


def test_em_runs_prepared_with_the_old_amp_flag_still_load(tmp_path):
    """Runs prepared before --precision replaced --amp keep their meaning on resume."""
    import zarr

    from psc.pipelines.em.layout import RunSettings

    out = tmp_path / "old.zarr"
    RunSettings(raw="raw.zarr", raw_name=None, weights="w.pt").save(out)
    group = zarr.open_group(str(out), mode="a")
    for amp, precision in ((True, "auto"), (False, "fp32")):
        settings = {k: v for k, v in group.attrs["psc"].items() if k not in ("precision", "amp")}
        group.attrs["psc"] = {**settings, "amp": amp}
        assert RunSettings.load(out).precision == precision
