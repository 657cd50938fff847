"""The backbones: shapes, exportability, conv selection, measured complexity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from psc.models import PmSCn, build_model, list_models, measure, subspace_width

TINY = {
    "densenet3d": {"init_channels": 4, "growth_rate": 4, "block_layers": (2, 2), "side_channels": 4},
    "unet3d": {"num_fmaps": 4, "fmap_inc_factor": 2},
    "resnet3d": {"width": 4, "out_channels": 5},
}
CONVS = ["conv3d", "p1sc1", "p2sc2", "p2sc3"]


def test_registry_lists_the_three_backbones():
    assert list_models() == ["densenet3d", "resnet3d", "unet3d"]
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vnet")
    with pytest.raises(ValueError):
        build_model("unet3d", conv="p4sc1")


def plain_3x3x3(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Conv3d and tuple(m.kernel_size) == (3, 3, 3)]


def check_conv_choice(model: nn.Module, conv: str) -> None:
    """conv3d: every 3x3x3 conv is a plain Conv3d; p{m}sc{n}: none is, and the blocks are p{m}sc{n}."""
    blocks = [m for m in model.modules() if isinstance(m, PmSCn)]
    if conv == "conv3d":
        assert plain_3x3x3(model) and not blocks
    else:
        assert plain_3x3x3(model) == [] and blocks
        assert all((b.m, b.n) == (int(conv[1]), int(conv[4])) for b in blocks)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("shape", [(20, 18, 22), (19, 17, 21)])
def test_densenet3d_keeps_input_size(conv, shape):
    model = build_model("densenet3d", conv=conv, **TINY["densenet3d"])
    with torch.no_grad():
        assert model(torch.randn(2, 1, *shape)).shape == (2, 4, *shape)
    check_conv_choice(model, conv)


@pytest.mark.parametrize("conv", ["conv3d", "p2sc2"])
def test_densenet3d_pads_odd_sizes_to_its_stride_grid(conv):
    """Sizes off the stride grid (here 8) are zero-padded at the far end and cropped
    back, so the coarse side outputs stay aligned with the input: the output equals the
    output of the explicitly padded input. (Upsampling the side outputs straight to 21
    voxels instead stretched them by a fraction of a voxel, and this failed.)"""
    torch.manual_seed(0)
    model = build_model("densenet3d", conv=conv, **{**TINY["densenet3d"], "block_layers": (1, 1, 1, 1)}).eval()
    assert model.size_divisor == 8
    x = torch.randn(1, 1, 21, 19, 26)
    with torch.no_grad():
        y = model(x)
        padded = model(torch.nn.functional.pad(x, (0, 6, 0, 5, 0, 3)))  # to 24, 24, 32
    assert torch.allclose(y, padded[:, :, :21, :19, :26], atol=1e-6)


@pytest.mark.parametrize("conv", CONVS)
def test_unet3d_same_and_valid(conv):
    same = build_model("unet3d", conv=conv, padding="same", **TINY["unet3d"])
    with torch.no_grad():
        y = same(torch.randn(1, 1, 24, 16, 32))
    assert y.shape == (1, 3, 24, 16, 32) and float(y.min()) >= 0 and float(y.max()) <= 1  # sigmoid affinities
    valid = build_model("unet3d", conv=conv, **TINY["unet3d"])
    # Each p2sc3 block trims 6 voxels in-plane (three 2D convs), so it needs a larger input.
    shape = (140, 140, 140) if conv == "p2sc3" else (92, 92, 92)
    with torch.no_grad():
        out = tuple(valid(torch.randn(1, 1, *shape)).shape[2:])
    assert out == valid.output_shape(shape)
    assert all(o < s for o, s in zip(out, shape))  # valid convolutions do trim
    if conv in ("conv3d", "p1sc1", "p2sc2"):  # both stand for two valid 3x3x3 convs per level
        assert out == (4, 4, 4)
    check_conv_choice(same, conv)
    check_conv_choice(valid, conv)


def test_unet3d_level_is_one_p2sc2_block():
    """Two convolutions per level -> one P2SC2 block per level (7 chains: 3 down, bottom, 3 up)."""
    model = build_model("unet3d", conv="p2sc2", **TINY["unet3d"])
    blocks = [m for m in model.modules() if isinstance(m, PmSCn)]
    assert len(blocks) == 7 and all(b.n == 2 and b.m == 2 for b in blocks)
    assert len([m for m in build_model("unet3d", conv="p1sc1", **TINY["unet3d"]).modules()
                if isinstance(m, PmSCn)]) == 14
    assert len(plain_3x3x3(build_model("unet3d", conv="conv3d", **TINY["unet3d"]))) == 14


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("depth", [18, 34])
def test_resnet3d_classifies(conv, depth):
    model = build_model("resnet3d", conv=conv, depth=depth, **TINY["resnet3d"])
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 32, 32)).shape == (2, 5)
    check_conv_choice(model, conv)


EXPORT_SHAPES = {"densenet3d": (16, 18, 20), "unet3d": (92, 92, 92), "resnet3d": (8, 32, 32)}


@pytest.mark.parametrize("name", ["densenet3d", "unet3d", "resnet3d"])
@pytest.mark.parametrize("conv", ["conv3d", "p2sc2"])
def test_torch_export_matches_eager(name, conv):
    torch.manual_seed(0)
    model = build_model(name, conv=conv, **TINY[name]).eval()
    in_channels = 3 if name == "resnet3d" else 1
    x = torch.randn(1, in_channels, *EXPORT_SHAPES[name])
    exported = torch.export.export(model, (x,))
    x2 = torch.randn_like(x)  # a fresh input, not the one traced with
    with torch.no_grad():
        for inp in (x, x2):
            torch.testing.assert_close(exported.module()(inp), model(inp))


GRAD_SHAPES = {"densenet3d": (16, 16, 16), "unet3d": (92, 92, 92), "resnet3d": (8, 32, 32)}


@pytest.mark.parametrize("name", ["densenet3d", "unet3d", "resnet3d"])
@pytest.mark.parametrize("conv", ["conv3d", "p2sc2"])
def test_gradients_reach_every_parameter(name, conv):
    # unet3d has no normalisation (as in Funke et al.): at 4 feature maps a whole
    # stream can start with dead ReLUs, so this check uses 8.
    torch.manual_seed(0)
    options = dict(TINY[name], num_fmaps=8) if name == "unet3d" else TINY[name]
    model = build_model(name, conv=conv, **options)
    x = torch.randn(2, 3 if name == "resnet3d" else 1, *GRAD_SHAPES[name])
    model(x).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert dead == []


def test_measured_receptive_field_and_macs():
    conv = nn.Conv3d(4, 8, 3, padding=1)
    stats = measure(conv, 4, (10, 10, 10))
    assert stats.receptive_field == (3, 3, 3)
    assert stats.macs_per_voxel == 4 * 8 * 27
    assert stats.parameters == 4 * 8 * 27 + 8
    # One stream (axis 0): two 3x3 in-plane convolutions, one 1D convolution along z.
    assert measure(PmSCn(4, 8, m=1, n=2), 4, (10, 10, 10)).receptive_field == (3, 5, 5)
    assert measure(PmSCn(4, 8, m=2, n=2), 4, (10, 10, 10)).receptive_field == (5, 5, 5)
    assert measure(nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Conv3d(2, 1, 3, padding=1)),
                   1, (10, 10, 10)).receptive_field == (5, 5, 5)


def test_measured_macs_of_a_pmscn_block():
    """Same padding, stride 1: every conv of a stream runs at every output voxel."""
    block = PmSCn(4, 8, m=1, n=2)
    mid = subspace_width(4, 8, 3, 1)
    assert block.mid_channels == mid
    expected = 4 * mid * 9 + mid * mid * 9 + mid * 8 * 3
    assert measure(block, 4, (10, 10, 10), with_receptive_field=False).macs_per_voxel == expected
