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


@pytest.mark.parametrize("name", ["unet", "unet-res", "dynunet"])
@pytest.mark.parametrize("conv", ["p1sc1", "p2sc2"])
def test_replacement_keeps_shapes_and_leaves_no_3x3x3_conv(name, conv):
    torch.manual_seed(0)
    net = monai_net(name)
    x = torch.randn(1, 1, 32, 32, 32)
    net.eval()
    before_shape = net(x).shape
    before_params = count_parameters(net)
    report = replace_conv3d(net, conv=conv)
    assert net(x).shape == before_shape
    left = [n for n, m in net.named_modules() if type(m) is nn.Conv3d and tuple(m.kernel_size) == (3, 3, 3)]
    assert left == []
    assert len(report.replaced) == sum(isinstance(m, PmSCn) for m in net.modules()) > 0
    assert count_parameters(net) - before_params == report.params_after - report.params_before
    assert all("3x3x3" in why for _, why in report.skipped)  # only non-3x3x3 convs are kept
    assert str(report).startswith(f"replaced {len(report.replaced)} Conv3d by {conv}")
    net.train()
    net(x).mean().backward()
    assert all(p.grad is not None for m in net.modules() if isinstance(m, PmSCn) for p in m.parameters())


def sample_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 4, 3, stride=2, padding=1), nn.Conv3d(4, 4, 3, padding=0),
                         nn.Conv3d(4, 4, 3, dilation=2, padding=2))


def test_strided_and_valid_convs_are_replaced_with_the_same_output():
    x = torch.randn(1, 2, 17, 17, 17)
    net = sample_net()
    shape = net(x).shape
    report = replace_conv3d(net, "p3sc1")
    assert net(x).shape == shape
    assert [r.name for r in report.replaced] == ["0", "1"] and report.skipped == [("2", "dilated or grouped")]


def test_valid_conv_is_kept_where_the_block_would_trim_more():
    x = torch.randn(1, 2, 17, 17, 17)
    net = sample_net()
    shape = net(x).shape
    report = replace_conv3d(net, "p2sc2")
    assert net(x).shape == shape
    assert [r.name for r in report.replaced] == ["0"]
    assert report.skipped[0][0] == "1" and "trims 4 voxels" in report.skipped[0][1]
