"""Inference-time fusion (models/fusion.py): the fused network computes the same
function as the original, for every backbone and convolution type, and the fusion
really happened (conv + ReLU pairs replaced, batch norms folded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from psc.models import build_model
from psc.models.fusion import BatchNormReLU3d, ConvReLU3d, fuse_for_inference
from psc.models.pmscn import PmSCn

TINY = {
    "densenet3d": ({"init_channels": 8, "growth_rate": 4, "block_layers": (2, 2), "side_channels": 4}, 24),
    "unet3d": ({"num_fmaps": 4, "fmap_inc_factor": 2, "downsample_factors": [[2, 2, 2], [2, 2, 2]]}, 64),
    "resnet3d": ({"width": 4, "out_channels": 5}, 24),
}


def randomise_batch_norms(model: nn.Module) -> None:
    """Trained-looking statistics, so folding them into the convolutions is tested."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)


@pytest.mark.parametrize("conv", ["conv3d", "p1sc1", "p2sc2", "p2sc3"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_fused_network_computes_the_same_function(name, conv):
    torch.manual_seed(0)
    options, side = TINY[name]
    model = build_model(name, conv=conv, **options).eval()
    randomise_batch_norms(model)
    fused = fuse_for_inference(model)
    assert any(isinstance(m, ConvReLU3d) for m in fused.modules())
    assert not any(isinstance(m, ConvReLU3d) for m in model.modules())  # the original is untouched
    channels = 3 if name == "resnet3d" else 1  # the ResNet takes RGB clips
    x = torch.randn(2, channels, side, side, side).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        expected, got = model(x), fused(x)
    scale = expected.abs().max()
    assert torch.allclose(got, expected, atol=1e-5 * float(scale), rtol=0), float((got - expected).abs().max())


def test_fusion_replaces_pairs_folds_batch_norm_and_keeps_positions():
    conv = nn.Conv3d(2, 3, 3, padding=1)
    chain = nn.Sequential(conv, nn.BatchNorm3d(3), nn.ReLU(), nn.Conv3d(3, 3, 1), nn.ReLU(), nn.Conv3d(3, 1, 1))
    randomise_batch_norms(chain)
    fused = fuse_for_inference(chain)
    kinds = [type(m) for m in fused]
    assert kinds == [ConvReLU3d, nn.Identity, nn.Identity, ConvReLU3d, nn.Identity, nn.Conv3d]
    x = torch.randn(1, 2, 9, 8, 7)
    with torch.inference_mode():
        assert torch.allclose(fused(x), chain.eval()(x), atol=1e-5)


def test_fused_convolution_falls_back_with_gradients():
    """Training (gradients on) takes the ordinary ops, so the fused module still trains."""
    layer = ConvReLU3d(nn.Conv3d(2, 3, 3, padding=1))
    x = torch.randn(1, 2, 6, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.conv.weight.grad is not None


def test_fused_bf16_autocast_matches_unfused():
    torch.manual_seed(0)
    options, side = TINY["unet3d"]
    model = build_model("unet3d", conv="p2sc2", **options).eval()
    fused = fuse_for_inference(model)
    x = torch.randn(1, 1, side, side, side).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(x).float(), fused(x).float()
    assert torch.allclose(got, expected, atol=1e-2 * float(expected.abs().max()))


def test_pre_activation_batch_norm_and_pmscn_batch_norm_are_fused():
    """A DenseNet's pre-activation (batch norm + ReLU before a convolution) becomes one
    depthwise kernel; a PmSCn block's batch norm is split over its streams and folded
    into their last convolutions, with the ReLU."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.BatchNorm3d(3), nn.ReLU(), PmSCn(3, 7, m=2, n=2), nn.BatchNorm3d(7), nn.ReLU(),
                          nn.Conv3d(7, 2, 1))
    randomise_batch_norms(chain)
    fused = fuse_for_inference(chain)
    kinds = [type(m) for m in fused]
    assert kinds == [BatchNormReLU3d, nn.Identity, PmSCn, nn.Identity, nn.Identity, nn.Conv3d]
    assert all(isinstance(stream.line, ConvReLU3d) and stream.line.conv.bias is not None
               for stream in fused[2].streams)
    x = torch.randn(2, 3, 10, 9, 8).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        expected, got = chain.eval()(x), fused(x)
    assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = fused(x).float()
    assert torch.allclose(low, expected, atol=3e-2 * float(expected.abs().max()))


def test_fused_batch_norm_falls_back_with_gradients():
    norm = nn.BatchNorm3d(4).eval()
    randomise_batch_norms(norm)
    layer = BatchNormReLU3d(norm)
    x = torch.randn(1, 4, 5, 5, 5, requires_grad=True)
    out = layer(x)
    assert torch.allclose(out, torch.relu(norm(x)))
    out.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
