"""CAKES (models/cakes.py) against explicit convolutions, its documented parameter rule,
the registry, the backbones, replace_conv3d, fusion, torch.export, and the search."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psc.models import build_model, fuse_for_inference, make_conv, measure, replace_conv3d
from psc.models.cakes import (
    Cakes,
    CakesSearch,
    arch_parameters,
    config_parameters,
    freeze_search,
    resolve_config,
    search_cost,
    weight_parameters,
)
from psc.models.fusion import ConvReLU3d

ALL_SHAPES = [(3, 3, 3), (1, 3, 3), (3, 1, 3), (3, 3, 1), (3, 1, 1), (1, 3, 1), (1, 1, 3)]
GEOMETRY = [(1, 1), (2, 1), ((1, 2, 2), 1), (1, 0), (2, 0)]  # (stride, padding)


def footprint(shape) -> torch.Tensor:
    """0/1 mask of a centred sub-kernel of a 3x3x3 kernel."""
    mask = torch.zeros(3, 3, 3, dtype=torch.float64)
    mask[tuple(slice((3 - s) // 2, (3 - s) // 2 + s) for s in shape)] = 1
    return mask


def masked_kernel(layer: Cakes) -> torch.Tensor:
    """The (out, in, 3, 3, 3) kernel a Cakes layer computes: each channel's sub-kernel in
    the centre of a zero 3x3x3 kernel, channels in the layer's output order."""
    full = torch.zeros(layer.out_channels, layer.in_channels, 3, 3, 3, dtype=torch.float64)
    for group, rows, shape in zip(layer.groups, layer.group_channels(), layer.config):
        index = tuple(slice((3 - s) // 2, (3 - s) // 2 + s) for s in shape)
        full[(rows, slice(None), *index)] = group.weight.detach()
    return full


def documented_parameters(cin: int, counts: dict, bias: bool = True) -> int:
    """in * sum_g c_g * |s_g| + out (the rule in models/cakes.py's docstring)."""
    return cin * sum(c * math.prod(s) for s, c in counts.items()) + (sum(counts.values()) if bias else 0)


# --- the layer against explicit convolutions --------------------------------------------


@pytest.mark.parametrize("stride,padding", GEOMETRY)
def test_every_channel_on_3x3x3_is_a_conv3d(stride, padding):
    """cakes-3d with a Conv3d's weights computes that Conv3d (odd sizes, strides 1, 2)."""
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 5, 3, stride=stride, padding=padding).double()
    layer = Cakes(3, 5, 3, stride, padding, config="3d").double()
    assert layer.config == {(3, 3, 3): 5} and len(layer.groups) == 1
    with torch.no_grad():
        layer.groups[0].weight.copy_(conv.weight)
        layer.groups[0].bias.copy_(conv.bias)
    x = torch.randn(2, 3, 9, 8, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x))
    # load_conv3d does the same, and says nothing was dropped.
    other = Cakes(3, 5, 3, stride, padding, config="3d").double()
    assert other.load_conv3d(conv) == 0.0
    with torch.no_grad():
        torch.testing.assert_close(other(x), conv(x))


@pytest.mark.parametrize("stride,padding", GEOMETRY)
@pytest.mark.parametrize("config", ["mix", "2d", "1d", {"1x3x3": 3, "3x3x3": 1, "1x1x3": 2}])
def test_layer_is_a_conv3d_with_each_channel_kernel_cut_to_its_shape(config, stride, padding):
    """Every group (its padding or centre crop, its stride) computes the Conv3d whose
    kernel is the channel's sub-kernel in the centre of a zero 3x3x3 kernel."""
    torch.manual_seed(1)
    layer = Cakes(4, 6, 3, stride, padding, config=config, bias=True).double()
    x = torch.randn(1, 4, 11, 9, 10, dtype=torch.float64)
    bias = torch.cat([g.bias for g in layer.groups]).detach()[torch.argsort(torch.cat(layer.group_channels()))]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv3d(x, masked_kernel(layer), bias, stride, padding))


def test_load_conv3d_keeps_the_central_slices_and_reports_the_dropped_energy():
    torch.manual_seed(2)
    conv = nn.Conv3d(3, 7, 3, padding=1).double()
    layer = Cakes(3, 7, config="mix").double()
    error = layer.load_conv3d(conv)
    kept = torch.zeros_like(conv.weight)
    for rows, shape in zip(layer.group_channels(), layer.config):
        kept[rows] = conv.weight.detach()[rows] * footprint(shape)
    torch.testing.assert_close(masked_kernel(layer), kept)
    assert error == pytest.approx(float((conv.weight - kept).detach().norm() / conv.weight.detach().norm()))
    x = torch.randn(1, 3, 7, 8, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv3d(x, kept, conv.bias, padding=1))
    with pytest.raises(ValueError):
        layer.load_conv3d(nn.Conv3d(3, 7, 3, stride=2, padding=1))  # another geometry


# --- shapes -----------------------------------------------------------------------------


# nn.Conv3d refuses padding="same" with a stride, so that one is checked at stride 1.
STRIDE_PADDING = [(s, p) for s in (1, 2, (1, 2, 2)) for p in (0, 1, "valid")] + [(1, "same")]


@pytest.mark.parametrize("config", ["2d", "1d", "3d", "mix"])
@pytest.mark.parametrize("shape", [(7, 9, 11), (5, 13, 6)])
@pytest.mark.parametrize("stride,padding", STRIDE_PADDING)
def test_output_shape_equals_conv3d(config, shape, stride, padding):
    x = torch.randn(1, 4, *shape)
    expected = nn.Conv3d(4, 6, 3, stride=stride, padding=padding)(x).shape
    assert Cakes(4, 6, 3, stride, padding, config=config)(x).shape == expected


# --- the configuration and the parameter rule -------------------------------------------


def test_presets_split_evenly_with_the_remainder_first():
    assert resolve_config("2d", 8) == {(1, 3, 3): 3, (3, 1, 3): 3, (3, 3, 1): 2}
    assert resolve_config(None, 8) == resolve_config("2d", 8)  # the documented default
    assert resolve_config("1d", 4) == {(3, 1, 1): 2, (1, 3, 1): 1, (1, 1, 3): 1}
    assert resolve_config("3d", 5) == {(3, 3, 3): 5}
    assert resolve_config("mix", 9) == {s: 2 if i < 2 else 1 for i, s in enumerate(ALL_SHAPES)}
    assert resolve_config("2d", 2) == {(1, 3, 3): 1, (3, 1, 3): 1}  # empty groups are left out


def test_counts_fractions_and_keys():
    # counts, any key spelling, canonical order whatever the order given
    assert list(resolve_config({(1, 1, 3): 2, "3x3x3": 1, "1X3X3": 3}, 6).items()) == [
        ((3, 3, 3), 1), ((1, 3, 3), 3), ((1, 1, 3), 2)]
    # fractions: largest remainder, ties to the earlier shape in the canonical order
    assert resolve_config({"1x3x3": 0.5, "3x1x1": 0.25, "3x3x3": 0.25}, 10) == {
        (3, 3, 3): 3, (1, 3, 3): 5, (3, 1, 1): 2}
    assert resolve_config({"3x1x3": 1.0, "3x3x1": 2.0}, 7) == {(3, 1, 3): 2, (3, 3, 1): 5}
    # pairs instead of a dict; another kernel size
    assert resolve_config([("1x5x5", 2), ("5x1x1", 2)], 4, kernel=5) == {(1, 5, 5): 2, (5, 1, 1): 2}


@pytest.mark.parametrize("config,out", [({"1x3x3": 3}, 4), ({"2x3x3": 4}, 4), ({"1x1x1": 4}, 4),
                                        ({"1x3x3": 2, (1, 3, 3): 2}, 4), ("5d", 4), ({}, 4),
                                        ({"1x3x3": -1.0}, 4), ({"1x3x3": 0.0}, 4), ({"1x3": 4}, 4)])
def test_bad_configurations_are_refused(config, out):
    with pytest.raises(ValueError):
        resolve_config(config, out)


def test_bad_layers_are_refused():
    with pytest.raises(ValueError):
        Cakes(4, 4, kernel_size=4)
    with pytest.raises(ValueError):
        Cakes(4, 4, kernel_size=(1, 3, 3))  # a size-1 axis would make two shapes one
    with pytest.raises(ValueError):
        Cakes(4, 4, padding=-1)
    with pytest.raises(ValueError):
        Cakes(4, 3, channel_order=[0, 0, 1])
    with pytest.raises(ValueError):
        make_conv("cakes")(4, 4, 3, dilation=2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cin,cout,config", [(1, 4, "2d"), (16, 16, "2d"), (7, 9, "mix"), (24, 12, "1d"),
                                             (5, 5, "3d"), (8, 10, {"1x3x3": 0.6, "3x1x1": 0.4}),
                                             (3, 6, {"3x3x3": 1, "3x3x1": 2, "1x3x1": 3})])
def test_parameter_count_follows_the_documented_rule(cin, cout, config, bias):
    layer = Cakes(cin, cout, config=config, bias=bias)
    count = sum(p.numel() for p in layer.parameters())
    assert count == documented_parameters(cin, layer.config, bias) == config_parameters(cin, layer.config, bias)
    assert sum(layer.config.values()) == cout


def test_the_default_costs_a_third_of_a_conv3d_and_measures_as_documented():
    """2D taps are 9 of 27: a third of the weights and of the multiply-accumulates; the
    receptive field of the default is the 3x3x3 box, of a single 1D group a line."""
    layer = Cakes(12, 12, padding=1, bias=False)
    assert sum(p.numel() for p in layer.parameters()) * 3 == 12 * 12 * 27
    stats = measure(layer, 12, (10, 10, 10))
    assert stats.macs_per_voxel == 12 * 12 * 9 and stats.receptive_field == (3, 3, 3)
    assert measure(Cakes(4, 4, padding=1, config={"3x1x1": 4}), 4, (10, 10, 10)).receptive_field == (3, 1, 1)
    assert measure(Cakes(4, 3, padding=1, config="mix"), 4, (10, 10, 10),
                   with_receptive_field=False).macs_per_voxel == 4 * (27 + 9 + 9)


# --- gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["mix", "2d"])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_gradients_reach_every_parameter(config, stride, padding):
    torch.manual_seed(3)
    layer = Cakes(3, 8, stride=stride, padding=padding, config=config)
    layer(torch.randn(2, 3, 11, 11, 11)).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_search_gradients_reach_weights_and_logits():
    torch.manual_seed(4)
    layer = CakesSearch(3, 6, padding=1)
    (layer(torch.randn(2, 3, 9, 9, 9)).square().mean() + search_cost(layer)).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


# --- the registry -----------------------------------------------------------------------


@pytest.mark.parametrize("name,config", [("cakes", "2d"), ("cakes-2d", "2d"), ("cakes-1d", "1d"),
                                         ("cakes-3d", "3d"), ("cakes-mix", "mix")])
def test_make_conv_builds_the_presets_with_conv3d_signature(name, config):
    builder = make_conv(name)
    assert builder.kind == "cakes" and builder.convs_per_block == 1 and not builder.is_separable
    module = builder(4, 9, 3, stride=2, padding=1, bias=False)  # Conv3d's positional/keyword order
    assert type(module) is Cakes and module.config == resolve_config(config, 9)
    assert all(g.bias is None for g in module.groups)
    x = torch.randn(1, 4, 9, 8, 7)
    assert module(x).shape == nn.Conv3d(4, 9, 3, stride=2, padding=1)(x).shape
    assert builder(4, 9, 3)(x).shape == nn.Conv3d(4, 9, 3)(x).shape  # Conv3d's default padding: 0


def test_builder_options_and_bad_names():
    builder = make_conv("cakes", config={"1x3x3": 0.5, "3x1x1": 0.5})
    assert builder(4, 6, 3, padding=1).config == {(1, 3, 3): 3, (3, 1, 1): 3}
    assert make_conv("cakes").with_options(config="1d")(4, 3, 3).config == resolve_config("1d", 3)
    assert hash(builder) == hash(make_conv("cakes", config={"1x3x3": 0.5, "3x1x1": 0.5}))  # options frozen
    search = make_conv("cakes-search", candidates="2d", temperature=0.5)(4, 6, 3, padding=1)
    assert type(search) is CakesSearch and search.shapes == ALL_SHAPES[1:4] and search.temperature == 0.5
    for bad in ("cakes-4d", "cakes2d", "cake"):
        with pytest.raises(ValueError):
            make_conv(bad)
    with pytest.raises(ValueError, match="takes no option"):
        make_conv("cakes", axial_atoms=2)
    assert make_conv("conv3d") == make_conv("conv3d") and make_conv("p2sc2").kind == "pmscn"


# --- backbones --------------------------------------------------------------------------

TINY = {
    "densenet3d": ({"init_channels": 6, "growth_rate": 4, "block_layers": (2, 2), "side_channels": 4}, (1, 19, 17, 21)),
    "unet3d": ({"num_fmaps": 4, "fmap_inc_factor": 2}, (1, 92, 92, 92)),
    "unet3d-same": ({"num_fmaps": 4, "fmap_inc_factor": 2, "padding": "same"}, (1, 24, 16, 32)),
    "resnet3d": ({"width": 4, "out_channels": 5}, (3, 8, 32, 32)),
}


def backbone(key: str, conv) -> nn.Module:
    return build_model(key.split("-")[0], conv=conv, **TINY[key][0])


def plain_3x3x3_outside(model: nn.Module, kind) -> list[str]:
    inside = {n for p, m in model.named_modules() if isinstance(m, kind) for n, _ in m.named_modules(prefix=p)}
    return [n for n, m in model.named_modules()
            if type(m) is nn.Conv3d and tuple(m.kernel_size) == (3, 3, 3) and n not in inside]


@pytest.mark.parametrize("key", sorted(TINY))
@pytest.mark.parametrize("conv", ["cakes", "cakes-mix", "cakes-search"])
def test_every_backbone_builds_and_runs_with_cakes(key, conv):
    torch.manual_seed(0)
    model = backbone(key, conv).eval()
    kind = CakesSearch if conv == "cakes-search" else Cakes
    assert any(isinstance(m, kind) for m in model.modules())
    assert plain_3x3x3_outside(model, kind) == []  # every 3x3x3 convolution was made by the builder
    reference = backbone(key, "conv3d").eval()
    x = torch.randn(1, *TINY[key][1])
    with torch.no_grad():
        y, y_ref = model(x), reference(x)
    assert y.shape == y_ref.shape and torch.isfinite(y).all()


# --- replace_conv3d ---------------------------------------------------------------------


def plain_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv3d(6, 6, 3, padding=0),
                         nn.ReLU(), nn.Conv3d(6, 4, 3, padding=1), nn.Conv3d(4, 4, 1),
                         nn.Conv3d(4, 4, 3, dilation=2, padding=2))


def test_replace_conv3d_with_cakes_3d_and_copied_weights_is_the_same_network():
    torch.manual_seed(5)
    net = plain_net().double()
    x = torch.randn(1, 2, 19, 17, 21, dtype=torch.float64)
    with torch.no_grad():
        expected = net(x)
    report = replace_conv3d(net, "cakes-3d", copy_weights=True)
    assert [r.name for r in report.replaced] == ["0", "2", "4"]
    assert [n for n, _ in report.skipped] == ["5", "6"]
    assert all(isinstance(net[int(r.name)], Cakes) and r.kernel_error == 0.0 for r in report.replaced)
    assert report.params_after == report.params_before
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected)
    # Replacing again does not take the layers apart (their 3x3x3 group is an nn.Conv3d).
    again = replace_conv3d(net, "cakes")
    assert again.replaced == [] and [n for n, _ in again.skipped] == ["5", "6"]


def test_replace_conv3d_with_a_configuration_per_layer():
    torch.manual_seed(6)
    net = plain_net()
    x = torch.randn(1, 2, 19, 17, 21)
    shape = net(x).shape
    per_layer = {"0": {"config": {"1x3x3": 4, "3x1x1": 2}}, "4": {"config": "1d"}}
    report = replace_conv3d(net, "cakes", per_layer=per_layer, copy_weights=True)
    assert net(x).shape == shape
    assert net[0].config == {(1, 3, 3): 4, (3, 1, 1): 2}
    assert net[2].config == resolve_config("2d", 6)  # the builder's own (default) configuration
    assert net[4].config == resolve_config("1d", 4)
    assert all(0 < r.kernel_error < 1 for r in report.replaced)
    assert "kernel error" in str(report)
    # The parameter bookkeeping follows the rule, layer by layer.
    assert [r.params_after for r in report.replaced] == [documented_parameters(2, net[0].config),
                                                         documented_parameters(6, net[2].config),
                                                         documented_parameters(6, net[4].config)]
    with pytest.raises(ValueError, match="not a replaceable"):
        replace_conv3d(plain_net(), "cakes", per_layer={"5": {"config": "1d"}})  # a 1x1x1 conv
    with pytest.raises(ValueError, match="cannot be set"):
        replace_conv3d(plain_net(), "p2sc2", copy_weights=True)
    chosen = replace_conv3d(plain_net(), "cakes", per_layer=lambda name, conv: {"config": "3d"}
                            if conv.stride == (2, 2, 2) else None)
    assert [r.params_after for r in chosen.replaced][0] == 2 * 6 * 27 + 6


# --- fusion and torch.export ------------------------------------------------------------


def randomise_batch_norms(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)


@pytest.mark.parametrize("key", ["densenet3d", "unet3d-same", "resnet3d"])
def test_fused_backbone_computes_the_same_function(key):
    torch.manual_seed(0)
    model = backbone(key, "cakes-mix").eval()
    randomise_batch_norms(model)
    fused = fuse_for_inference(model)
    assert any(isinstance(m, Cakes) and any(isinstance(g, ConvReLU3d) for g in m.groups) for m in fused.modules())
    x = torch.randn(2, *TINY[key][1]).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        expected, got = model(x), fused(x)
    assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


def test_batch_norm_is_folded_per_group_also_for_a_reordered_layer():
    """A frozen search keeps its channel order through a gather; the batch norm's
    channels must follow it into the groups."""
    torch.manual_seed(7)
    search = CakesSearch(3, 7, padding=1)
    with torch.no_grad():
        search.arch_logits.copy_(torch.randn(7, 7) * 5)
    layer = search.to_cakes()
    assert layer.gather is not None  # the channels are not grouped in order
    chain = nn.Sequential(layer, nn.BatchNorm3d(7), nn.ReLU(), nn.Conv3d(7, 2, 1))
    randomise_batch_norms(chain)
    chain.eval()
    fused = fuse_for_inference(chain)
    assert [type(m) for m in fused] == [Cakes, nn.Identity, nn.Identity, nn.Conv3d]
    assert all(isinstance(g, ConvReLU3d) for g in fused[0].groups)
    x = torch.randn(2, 3, 10, 9, 8)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), chain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key,conv", [("densenet3d", "cakes"), ("unet3d-same", "cakes-mix"),
                                      ("resnet3d", "cakes-1d"), ("unet3d-same", "cakes-search")])
def test_torch_export_matches_eager(key, conv):
    torch.manual_seed(0)
    model = backbone(key, conv).eval()
    x = torch.randn(1, *TINY[key][1])
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        for inp in (x, torch.randn_like(x)):
            torch.testing.assert_close(exported.module()(inp), model(inp))


def test_torch_export_of_a_reordered_layer():
    torch.manual_seed(8)
    search = CakesSearch(3, 6, stride=2, padding=0)
    with torch.no_grad():
        search.arch_logits.copy_(torch.randn(6, 7) * 5)
    layer = search.to_cakes().eval()
    x = torch.randn(1, 3, 11, 10, 9)
    exported = torch.export.export(layer, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), layer(x))


# --- the search -------------------------------------------------------------------------


def test_search_relaxation_is_one_convolution_of_the_cut_super_kernel():
    """Eval mode: each channel's kernel is the super-kernel cut to its most probable
    shape; training: a one-hot sample per channel (straight-through)."""
    torch.manual_seed(9)
    layer = CakesSearch(3, 5, stride=2, padding=1).double()
    with torch.no_grad():
        layer.arch_logits.copy_(torch.randn(5, 7, dtype=torch.float64))
    x = torch.randn(1, 3, 9, 8, 7, dtype=torch.float64)
    choice = layer.arch_logits.argmax(1)
    kernel = layer.weight.detach() * torch.stack([footprint(ALL_SHAPES[c]) for c in choice])[:, None]
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv3d(x, kernel, layer.bias, 2, 1))
    layer.train()
    selection = layer.selection()
    assert torch.equal(selection.sum(1), torch.ones(5, dtype=torch.float64)) and set(selection.unique().tolist()) <= {0, 1}


def test_search_trains_on_a_toy_problem_and_freezes_to_the_teachers_configuration():
    """A teacher CAKES layer with 2D and 1D channels; the search (all seven candidates,
    super-kernel weights and logits trained together with a small cost term) finds each
    channel's shape, and freezes to a plain configuration whose layer computes what the
    search layer computes."""
    torch.manual_seed(0)
    teacher = Cakes(4, 6, config={"1x3x3": 2, "3x1x1": 2, "1x1x3": 2}, padding=1)
    student = CakesSearch(4, 6, padding=1)
    weights = torch.optim.Adam(weight_parameters(student), lr=3e-2)
    arch = torch.optim.Adam(arch_parameters(student), lr=1e-1)
    assert len(arch_parameters(student)) == 1 and len(weight_parameters(student)) == 2
    first = None
    for _ in range(200):
        x = torch.randn(4, 4, 10, 10, 10)
        with torch.no_grad():
            target = teacher(x)
        fit = (student(x) - target).square().mean() / target.square().mean()
        first = float(fit.detach()) if first is None else first
        loss = fit + 0.05 * search_cost(student)
        weights.zero_grad()
        arch.zero_grad()
        loss.backward()
        weights.step()
        arch.step()
    config = student.freeze()
    assert sum(config.values()) == 6 and set(config) <= set(ALL_SHAPES)
    assert config == teacher.config  # here the search recovers the teacher, channel by channel
    assert student.choice().tolist() == [1, 1, 4, 4, 6, 6]
    student.eval()
    x = torch.randn(2, 4, 10, 10, 10)
    with torch.no_grad():
        fit = float((student(x) - teacher(x)).square().mean() / teacher(x).square().mean())
        frozen = student.to_cakes()
        torch.testing.assert_close(frozen(x), student(x), atol=1e-5, rtol=1e-5)
    assert fit < 1e-2 * first
    assert frozen.config == config and frozen.gather is None  # channels already grouped in order
    assert resolve_config(config, 6) == config  # a valid plain configuration


def test_freeze_search_in_a_network_and_rebuild_it_from_a_plain_one():
    torch.manual_seed(10)
    model = build_model("unet3d", conv="cakes-search", **TINY["unet3d-same"][0])
    for _, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, CakesSearch)]:
        with torch.no_grad():
            layer.arch_logits.copy_(torch.randn_like(layer.arch_logits) * 3)
    model.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = model(x)
    cost = float(search_cost(model).detach())
    configs = freeze_search(model)
    assert len(configs) == 14 and not any(isinstance(m, CakesSearch) for m in model.modules())
    assert all(sum(c.values()) == model.get_submodule(n).out_channels for n, c in configs.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    # The same architecture from the conv3d network: per_layer takes the frozen configs.
    plain = build_model("unet3d", conv="conv3d", **TINY["unet3d-same"][0])
    report = replace_conv3d(plain, "cakes", per_layer={n: {"config": c} for n, c in configs.items()})
    assert len(report.replaced) == 14
    assert all(plain.get_submodule(n).config == c for n, c in configs.items())
    assert 0 < cost <= 1
    with pytest.raises(ValueError, match="no CakesSearch"):
        search_cost(plain)
