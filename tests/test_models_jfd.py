"""Joint filter decomposition (models/jfd.py) against explicit convolutions, its
documented parameter rule, atom swapping, the registry, the backbones, replace_conv3d,
fusion and torch.export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psc.models import build_model, fuse_for_inference, make_conv, measure, replace_conv3d
from psc.models.fusion import ConvReLU3d
from psc.models.jfd import JFD, JointFilterDecomposition, jfd_parameters

GEOMETRY = [(1, 1), (2, 1), ((1, 2, 2), 1), (1, 0), (2, 0)]  # (stride, padding)


def documented_parameters(cin, cout, a, b, ka=3, kp=3, bias=True) -> int:
    """A*ka + B*kp^2 + out*in*A*B + out (the rule in models/jfd.py's docstring)."""
    return a * ka + b * kp * kp + cout * cin * a * b + (cout if bias else 0)


def explicit_kernel(layer: JointFilterDecomposition) -> torch.Tensor:
    """W[o, i] = sum_ab C[o, i, a, b] T_a (x) S_b, written out with loops (axis 0)."""
    assert layer.axis == 0 and layer.axial_dilation == 1
    c = layer.coefficients.weight.detach().view(layer.out_channels, layer.in_channels, layer.axial_atoms,
                                                layer.planar_atoms)
    t, s = layer.axial.detach(), layer.planar.detach()
    w = torch.zeros(layer.out_channels, layer.in_channels, t.shape[1], *s.shape[1:], dtype=t.dtype)
    for a in range(layer.axial_atoms):
        for b in range(layer.planar_atoms):
            w += c[:, :, a, b, None, None, None] * t[a][:, None, None] * s[b][None]
    return w


# --- the layer against explicit convolutions --------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("stride,padding", GEOMETRY)
def test_full_atom_sets_reproduce_a_conv3d_exactly(axis, stride, padding):
    """3 axial x 9 planar atoms span every 3x3x3 kernel: set from a Conv3d's weights,
    the layer computes that Conv3d (odd sizes, strides 1 and 2, same and valid)."""
    torch.manual_seed(axis)
    conv = nn.Conv3d(3, 5, 3, stride=stride, padding=padding).double()
    layer = JFD.from_conv3d(conv, axis=axis)
    assert (layer.axial_atoms, layer.planar_atoms) == (3, 9)
    x = torch.randn(2, 3, 9, 8, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x))
    # The same with random (not fitted) atoms: they are a basis too, the coefficients are solved.
    other = JFD(3, 5, 3, stride, padding, axial_atoms=3, planar_atoms=9, axis=axis).double()
    assert other.load_conv3d(conv, fit_atoms=False) < 1e-10
    with torch.no_grad():
        torch.testing.assert_close(other(x), conv(x))


@pytest.mark.parametrize("stride,padding", GEOMETRY)
@pytest.mark.parametrize("atoms", [(2, 6), (1, 1), (3, 4), (4, 10)])
def test_layer_is_the_conv3d_of_its_equivalent_kernel(atoms, stride, padding):
    """Any atom counts (over-complete ones too): the three convolutions compute F.conv3d
    with W = sum C T (x) S, written out here with loops."""
    torch.manual_seed(sum(atoms))
    layer = JFD(4, 3, 3, stride, padding, axial_atoms=atoms[0], planar_atoms=atoms[1]).double()
    kernel = explicit_kernel(layer)
    torch.testing.assert_close(layer.equivalent_kernel().detach(), kernel)
    x = torch.randn(1, 4, 11, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv3d(x, kernel, layer.coefficients.bias, stride, padding))


@pytest.mark.parametrize("axis", [1, 2])
def test_the_axial_axis_can_be_any_axis(axis):
    torch.manual_seed(11)
    layer = JFD(2, 3, axial_atoms=2, planar_atoms=3, axis=axis).double()
    assert layer.planar.shape == (3, 3, 3) and layer.axial.shape == (2, 3)
    x = torch.randn(1, 2, 7, 8, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv3d(x, layer.equivalent_kernel(), layer.coefficients.bias,
                                                      padding=1))
    # The kernel is separable across the axial axis and the plane for a single pair (A = B = 1).
    single = JFD(1, 1, axial_atoms=1, planar_atoms=1, axis=axis).double()
    w = single.equivalent_kernel().detach()[0, 0].movedim(axis, 0).reshape(3, 9)
    assert torch.linalg.matrix_rank(w) == 1


def test_fewer_atoms_approximate_by_truncated_hosvd():
    """With fewer atoms load_conv3d is an approximation; its reported error is the
    kernel's, and more atoms never do worse."""
    torch.manual_seed(12)
    conv = nn.Conv3d(6, 8, 3, padding=1).double()
    errors = []
    for a, b in [(1, 3), (2, 6), (3, 6), (3, 9)]:
        layer = JFD(6, 8, axial_atoms=a, planar_atoms=b).double()
        error = layer.load_conv3d(conv)
        w = layer.equivalent_kernel().detach()
        assert error == pytest.approx(float((w - conv.weight.detach()).norm() / conv.weight.detach().norm()))
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12 and errors[0] > 0.1
    with pytest.raises(ValueError):
        JFD(6, 8, stride=2).load_conv3d(conv)  # another geometry
    with pytest.raises(TypeError):
        JFD(6, 8).load_conv3d(nn.Conv2d(6, 8, 3))


# --- shapes -----------------------------------------------------------------------------

STRIDE_PADDING = [(s, p) for s in (1, 2, (1, 2, 2)) for p in (0, 1, "valid")] + [(1, "same")]


@pytest.mark.parametrize("name", ["jfd", "jfd1x1", "jfd3x9"])
@pytest.mark.parametrize("shape", [(7, 9, 11), (5, 13, 6)])
@pytest.mark.parametrize("stride,padding", STRIDE_PADDING)
def test_output_shape_equals_conv3d(name, shape, stride, padding):
    x = torch.randn(1, 4, *shape)
    expected = nn.Conv3d(4, 6, 3, stride=stride, padding=padding)(x).shape
    assert make_conv(name)(4, 6, 3, stride=stride, padding=padding)(x).shape == expected


# --- the parameter rule and the cost ----------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cin,cout,a,b", [(1, 4, 2, 6), (16, 16, 2, 6), (7, 9, 3, 9), (24, 12, 1, 3),
                                          (5, 5, 3, 4), (3, 8, 4, 12)])
def test_parameter_count_follows_the_documented_rule(cin, cout, a, b, bias):
    layer = JFD(cin, cout, axial_atoms=a, planar_atoms=b, bias=bias)
    expected = documented_parameters(cin, cout, a, b, bias=bias)
    assert sum(p.numel() for p in layer.parameters()) == expected == jfd_parameters(cin, cout, a, b, bias=bias)


def test_measured_macs_and_receptive_field():
    """Same padding, stride 1: in*A*ka + in*A*B*kp^2 + in*A*B*out per output voxel; the
    receptive field is the kernel's box, dilated on the axial axis when the atoms are."""
    cin, cout, a, b = 4, 8, 2, 6
    layer = JFD(cin, cout, axial_atoms=a, planar_atoms=b)
    stats = measure(layer, cin, (10, 10, 10))
    assert stats.macs_per_voxel == cin * a * 3 + cin * a * b * 9 + cin * a * b * cout
    assert stats.receptive_field == (3, 3, 3) and stats.parameters == documented_parameters(cin, cout, a, b)
    assert measure(JFD(cin, cout, axis=2).dilate_axial(3), cin, (12, 12, 12)).receptive_field == (3, 3, 7)
    # The default keeps 12 of 27 atom products: 0.44x a Conv3d's weights at equal width.
    default = make_conv("jfd")(32, 32, 3, padding=1, bias=False)
    assert (default.axial_atoms, default.planar_atoms) == (2, 6)
    assert sum(p.numel() for p in default.parameters()) == 2 * 3 + 6 * 9 + 32 * 32 * 12


# --- atom swapping ----------------------------------------------------------------------


def test_dilated_axial_atoms_keep_coefficients_and_output_size():
    """The paper's tempo-invariance: the same atoms with taps d apart along the axis; the
    kernel is the old one spread out with zeros, and the output keeps its size."""
    torch.manual_seed(13)
    layer = JFD(3, 4, axial_atoms=2, planar_atoms=5).double()
    before = layer.equivalent_kernel().detach()
    coefficients = layer.coefficients.weight.detach().clone()
    x = torch.randn(1, 3, 13, 9, 8, dtype=torch.float64)
    assert layer.dilate_axial(2) is layer and layer.axial_dilation == 2
    after = layer.equivalent_kernel().detach()
    assert after.shape[2] == 5 and torch.equal(after[:, :, ::2], before) and not after[:, :, 1::2].any()
    assert torch.equal(layer.coefficients.weight, coefficients)
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y, F.conv3d(x, after, layer.coefficients.bias, padding=(2, 1, 1)))
    assert y.shape[2:] == x.shape[2:]
    valid = JFD(3, 4, padding=0).dilate_axial(2)
    assert valid(x.float()).shape[2:] == (11, 7, 6)  # valid keeps the valid 3x3x3 output size


def test_swapped_atoms_of_another_size():
    torch.manual_seed(14)
    layer = JFD(3, 4, axial_atoms=2, planar_atoms=3).double()
    x = torch.randn(1, 3, 9, 10, 11, dtype=torch.float64)
    layer.swap_atoms(axial=torch.randn(2, 5, dtype=torch.float64), planar=torch.randn(3, 5, 1, dtype=torch.float64))
    kernel = layer.equivalent_kernel().detach()
    assert kernel.shape[2:] == (5, 5, 1)
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y, F.conv3d(x, kernel, layer.coefficients.bias, padding=(2, 2, 0)))
    assert y.shape[2:] == x.shape[2:]
    for bad in ({"axial": torch.randn(3, 3)}, {"axial": torch.randn(2, 4)}, {"planar": torch.randn(3, 3)}):
        with pytest.raises(ValueError):
            layer.swap_atoms(**bad)


def test_alternating_stages_fix_one_atom_set():
    torch.manual_seed(15)
    layer = JFD(3, 4).set_atoms_trainable(axial=True, planar=False)  # the temporal stage
    layer(torch.randn(1, 3, 7, 7, 7)).square().mean().backward()
    assert layer.planar.grad is None and layer.axial.grad is not None and layer.coefficients.weight.grad is not None
    layer.set_atoms_trainable(axial=False, planar=True)
    assert not layer.axial.requires_grad and layer.planar.requires_grad


# --- gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jfd", "jfd3x9", "jfd1x2"])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_gradients_reach_every_parameter(name, stride, padding):
    torch.manual_seed(3)
    layer = make_conv(name)(3, 8, 3, stride=stride, padding=padding)
    layer(torch.randn(2, 3, 11, 11, 11)).square().mean().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, pname


# --- the registry -----------------------------------------------------------------------


def test_make_conv_names_and_options():
    for name, atoms in [("jfd", (2, 6)), ("JFD", (2, 6)), ("jfd3x9", (3, 9)), ("jfd1x4", (1, 4)),
                        ("jfd12x20", (12, 20))]:
        builder = make_conv(name)
        assert builder.kind == "jfd" and builder.convs_per_block == 1
        module = builder(4, 8, 3, stride=2, padding=1, bias=False)  # Conv3d's positional/keyword order
        assert type(module) is JointFilterDecomposition and (module.axial_atoms, module.planar_atoms) == atoms
        assert module.coefficients.bias is None and module.stride == (2, 2, 2)
    module = make_conv("jfd", axial_atoms=3, axial_dilation=2, axis=1)(4, 8, 3, padding=1)
    assert (module.axial_atoms, module.planar_atoms, module.axial_dilation, module.axis) == (3, 6, 2, 1)
    assert make_conv("jfd3x9").with_options(planar_atoms=4)(2, 2).planar_atoms == 4
    for bad in ("jfd0x3", "jfd3x", "jfd-3x9", "jfd3x9x1"):
        with pytest.raises(ValueError):
            make_conv(bad)
    with pytest.raises(ValueError, match="takes no option"):
        make_conv("jfd", config="2d")
    with pytest.raises(ValueError):
        make_conv("jfd")(4, 8, 3, groups=2)
    for kwargs in ({"axis": 3}, {"axial_atoms": 0}, {"kernel_size": 4}, {"axial_dilation": 0}, {"padding": -1}):
        with pytest.raises(ValueError):
            JFD(4, 8, **kwargs)


# --- backbones --------------------------------------------------------------------------

TINY = {
    "densenet3d": ({"init_channels": 6, "growth_rate": 4, "block_layers": (2, 2), "side_channels": 4}, (1, 19, 17, 21)),
    "unet3d": ({"num_fmaps": 4, "fmap_inc_factor": 2}, (1, 92, 92, 92)),
    "unet3d-same": ({"num_fmaps": 4, "fmap_inc_factor": 2, "padding": "same"}, (1, 24, 16, 32)),
    "resnet3d": ({"width": 4, "out_channels": 5}, (3, 8, 32, 32)),
}


def backbone(key: str, conv) -> nn.Module:
    return build_model(key.split("-")[0], conv=conv, **TINY[key][0])


@pytest.mark.parametrize("key", sorted(TINY))
@pytest.mark.parametrize("conv", ["jfd", "jfd3x9"])
def test_every_backbone_builds_and_runs_with_jfd(key, conv):
    torch.manual_seed(0)
    model = backbone(key, conv).eval()
    layers = [m for m in model.modules() if isinstance(m, JointFilterDecomposition)]
    assert layers and [n for n, m in model.named_modules()
                       if type(m) is nn.Conv3d and tuple(m.kernel_size) == (3, 3, 3)] == []
    reference = backbone(key, "conv3d").eval()
    x = torch.randn(1, *TINY[key][1])
    with torch.no_grad():
        y, y_ref = model(x), reference(x)
    assert y.shape == y_ref.shape and torch.isfinite(y).all()


def test_a_conv3d_backbone_converted_with_full_atoms_is_the_same_network():
    """replace_conv3d with jfd3x9 and copied weights reproduces a whole conv3d U-Net
    (valid padding, in float64) and a DenseNet with batch norms (in float32: its first
    convolution always runs in float32)."""
    for key, dtype in (("unet3d", torch.float64), ("densenet3d", torch.float32)):
        torch.manual_seed(0)
        model = backbone(key, "conv3d").to(dtype).eval()
        randomise_batch_norms(model)
        x = torch.randn(1, *TINY[key][1], dtype=dtype)
        with torch.no_grad():
            expected = model(x)
        report = replace_conv3d(model, "jfd3x9", copy_weights=True)
        assert report.replaced and all(r.kernel_error < 1e-6 for r in report.replaced)
        with torch.no_grad():
            got = model(x)
        assert torch.allclose(got, expected, atol=(1e-10 if dtype == torch.float64 else 1e-5) * float(
            expected.abs().max()), rtol=0)


# --- replace_conv3d on a plain torch model ----------------------------------------------


def test_replace_conv3d_on_a_plain_model():
    torch.manual_seed(16)
    net = nn.Sequential(nn.Conv3d(2, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv3d(6, 6, 3, padding=0),
                        nn.ReLU(), nn.Conv3d(6, 4, 3, padding="same"), nn.Conv3d(4, 4, 1))
    x = torch.randn(1, 2, 19, 17, 21)
    with torch.no_grad():
        expected = net(x)
    report = replace_conv3d(net, "jfd", per_layer={"4": {"axial_atoms": 3, "planar_atoms": 9}}, copy_weights=True)
    assert [r.name for r in report.replaced] == ["0", "2", "4"] and [n for n, _ in report.skipped] == ["5"]
    assert [(net[i].axial_atoms, net[i].planar_atoms) for i in (0, 2, 4)] == [(2, 6), (2, 6), (3, 9)]
    assert [r.params_after for r in report.replaced] == [documented_parameters(2, 6, 2, 6),
                                                         documented_parameters(6, 6, 2, 6),
                                                         documented_parameters(6, 4, 3, 9)]
    assert report.replaced[2].kernel_error < 1e-6 < report.replaced[0].kernel_error
    with torch.no_grad():
        y = net(x)
    assert y.shape == expected.shape
    # Replacing again finds nothing new: the 1x1x1 coefficient convolutions stay.
    assert replace_conv3d(net, "jfd").replaced == []


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
    model = backbone(key, "jfd").eval()
    randomise_batch_norms(model)
    fused = fuse_for_inference(model)
    assert any(isinstance(m, JointFilterDecomposition) and isinstance(m.coefficients, ConvReLU3d)
               for m in fused.modules())
    x = torch.randn(2, *TINY[key][1]).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        expected, got = model(x), fused(x)
    assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


def test_batch_norm_and_relu_fold_into_the_coefficients():
    torch.manual_seed(17)
    chain = nn.Sequential(JFD(3, 5), nn.BatchNorm3d(5), nn.ReLU(), nn.Conv3d(5, 2, 1))
    randomise_batch_norms(chain)
    chain.eval()
    fused = fuse_for_inference(chain)
    assert [type(m) for m in fused] == [JointFilterDecomposition, nn.Identity, nn.Identity, nn.Conv3d]
    assert isinstance(fused[0].coefficients, ConvReLU3d) and fused[0].coefficients.conv.bias is not None
    x = torch.randn(2, 3, 10, 9, 8)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), chain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key,conv", [("densenet3d", "jfd"), ("unet3d", "jfd"), ("resnet3d", "jfd3x9")])
def test_torch_export_matches_eager(key, conv):
    torch.manual_seed(0)
    model = backbone(key, conv).eval()
    x = torch.randn(1, *TINY[key][1])
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        for inp in (x, torch.randn_like(x)):
            torch.testing.assert_close(exported.module()(inp), model(inp))


# --- psc-models: the receptive field of a whole backbone --------------------------------


def test_densenet_receptive_field_is_measured_for_every_kind():
    """psc-models' narrow DenseNet twin: CAKES and JFD layers are 3x3x3 boxes like the
    Conv3d's, so the network's field is the conv3d one; P2SC2 (two 2D convolutions per
    layer) reaches twice as far. The probe runs in float64 all through (DenseNet's first
    convolution and head no longer cut it to float32, where the gradient at the edge of
    P2SC2's field underflowed and the field came out as 277 x 287 x 293)."""
    from psc.app.models_table import NARROW
    from psc.models import receptive_field

    fields = {conv: receptive_field(build_model("densenet3d", conv=conv, **NARROW["densenet3d"]), 1)
              for conv in ("conv3d", "cakes", "jfd", "p2sc2")}
    assert fields == {"conv3d": (147,) * 3, "cakes": (147,) * 3, "jfd": (147,) * 3, "p2sc2": (295,) * 3}
