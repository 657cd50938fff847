"""Norm and activation names: the ones psc resolves itself (to keep MONAI's import off
every command's start-up) build exactly what MONAI's factories build, and the others
still reach MONAI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from monai.networks.layers.utils import get_act_layer, get_norm_layer

from psc.models.layers import TORCH_ACTS, TORCH_NORMS, act_layer, norm_layer


@pytest.mark.parametrize("name", sorted(TORCH_NORMS))
@pytest.mark.parametrize("form", ["name", "upper", "with-args"])
def test_norms_are_monais(name, form):
    spec = {"name": name, "upper": name.upper(),
            "with-args": (name, {"affine": True, "momentum": 0.3})}[form]
    ours, monai = norm_layer(spec, 12)[0], get_norm_layer(spec, spatial_dims=3, channels=12)
    assert type(ours) is type(monai) and repr(ours) == repr(monai)
    x = torch.randn(2, 12, 4, 5, 6)
    torch.testing.assert_close(ours(x), monai(x))


@pytest.mark.parametrize("name", sorted(TORCH_ACTS))
def test_activations_are_monais(name):
    for spec in (name, (name.upper(), {})):
        ours, monai = act_layer(spec)[0], get_act_layer(spec)
        assert type(ours) is type(monai) and repr(ours) == repr(monai)
    ours, monai = act_layer(("leakyrelu", {"negative_slope": 0.2}))[0], get_act_layer(("leakyrelu", {"negative_slope": 0.2}))
    assert repr(ours) == repr(monai)


def test_other_names_go_to_monai():
    group = norm_layer(("group", {"num_groups": 4}), 12)[0]
    assert isinstance(group, torch.nn.GroupNorm) and group.num_groups == 4
    assert type(act_layer("swish")[0]).__module__.startswith("monai")


def test_building_a_network_does_not_import_monai():
    code = ("import sys; from psc.models import build_model; build_model('unet3d', conv='p2sc2'); "
            "build_model('densenet3d', conv='conv3d', in_channels=1, out_channels=4); "
            "print(any(m == 'monai' or m.startswith('monai.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
