"""replace_conv3d on networks psc did not build (MONAI's UNet and DynUNet)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet, UNet
from torch import nn

from psc.models import PmSCn, count_parameters, replace_conv3d


def monai_net(name: str) -> nn.Module:
    if name == "dynunet":
        return DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                       upsample_kernel_size=[2, 2])
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                num_res_units=2 if name == "unet-res" else 0)


def conv3ds(net: nn.Module) -> dict[str, nn.Conv3d]:
    return {n: m for n, m in net.named_modules() if type(m) is nn.Conv3d}


@pytest.mark.parametrize("name", ["unet", "unet-res", "dynunet"])
@pytest.mark.parametrize("conv", ["p1sc1", "p2sc2"])
def test_replacement_keeps_shapes_and_leaves_no_3x3x3_conv(name, conv):
    torch.manual_seed(0)
    net = monai_net(name)
    x = torch.randn(1, 1, 32, 32, 32)
    net.eval()
    with torch.no_grad():
        before_shape = net(x).shape
    before_params = count_parameters(net)
    original = conv3ds(net)
    cubic = {n: m for n, m in original.items() if tuple(m.kernel_size) == (3, 3, 3)}
    others = {n: m for n, m in original.items() if n not in cubic}
    strides = {n: tuple(m.stride) for n, m in cubic.items()}
    assert cubic, "the net has 3x3x3 convolutions to replace"

    report = replace_conv3d(net, conv=conv)

    with torch.no_grad():
        assert net(x).shape == before_shape
    assert [n for n, m in conv3ds(net).items() if tuple(m.kernel_size) == (3, 3, 3)] == []
    # Every 3x3x3 conv was replaced, in place, by a block with its channels and stride.
    assert [r.name for r in report.replaced] == list(cubic)
    for r in report.replaced:
        block = net.get_submodule(r.name)
        assert isinstance(block, PmSCn) and (block.m, block.n) == (int(conv[1]), int(conv[4]))
        assert (block.in_channels, block.out_channels, block.stride) == (
            cubic[r.name].in_channels, cubic[r.name].out_channels, strides[r.name])
        assert r.params_before == count_parameters(cubic[r.name]) and r.params_after == count_parameters(block)
    # Parameter bookkeeping agrees with the model's own count.
    assert count_parameters(net) - before_params == report.params_after - report.params_before
    assert report.params_before == sum(count_parameters(m) for m in cubic.values())
    # What was kept is listed with its reason (here: 1x1x1 convolutions, where the net has them).
    assert [n for n, _ in report.skipped] == list(others)
    for n, why in report.skipped:
        assert f"kernel {tuple(others[n].kernel_size)} is not 3x3x3" == why
        assert net.get_submodule(n) is others[n]
    assert str(report).startswith(f"replaced {len(report.replaced)} Conv3d by {conv}")
    # Gradient flows into every new block.
    net.train()
    net(x).square().mean().backward()
    for m in net.modules():
        if isinstance(m, PmSCn):
            assert all(p.grad is not None for p in m.parameters())
            assert sum(float(p.grad.abs().sum()) for p in m.parameters()) > 0


def test_nets_with_1x1x1_convolutions_report_them():
    """DynUNet's output layer and the residual units' projections are 1x1x1."""
    for name in ("dynunet", "unet-res"):
        report = replace_conv3d(monai_net(name), "p1sc1")
        assert report.skipped and all("(1, 1, 1) is not 3x3x3" in why for _, why in report.skipped)


def sample_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 4, 3, stride=2, padding=1), nn.Conv3d(4, 4, 3, padding=0),
                         nn.Conv3d(4, 4, 3, dilation=2, padding=2), nn.Conv3d(4, 4, 3, stride=3, padding=1),
                         nn.Conv3d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv3d(4, 4, 3, padding=1),
                         nn.Conv3d(4, 4, (1, 3, 3), padding=1))


def test_strided_and_valid_convs_are_replaced_with_the_same_output():
    x = torch.randn(1, 2, 23, 23, 23)
    net = sample_net()
    shape = net(x).shape
    report = replace_conv3d(net, "p3sc1")
    assert net(x).shape == shape
    assert [r.name for r in report.replaced] == ["0", "1", "5"]
    assert [n for n, _ in report.skipped] == ["2", "3", "4", "6"]
    assert report.skipped[0] == ("2", "dilated or grouped") and "stride" in report.skipped[1][1]
    assert "reflect" in report.skipped[2][1] and report.skipped[3] == ("6", "kernel (1, 3, 3) is not 3x3x3")


def test_valid_conv_is_kept_where_the_block_would_trim_more():
    x = torch.randn(1, 2, 23, 23, 23)
    net = sample_net()
    shape = net(x).shape
    report = replace_conv3d(net, "p2sc2")
    assert net(x).shape == shape
    assert [r.name for r in report.replaced] == ["0", "5"]
    assert report.skipped[0][0] == "1" and "trims 4 voxels" in report.skipped[0][1]


def test_replacing_a_conv3d_model_keeps_dtype_and_training_mode():
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1)).double().eval()
    replace_conv3d(net, "p2sc2")
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert not net[0].training
