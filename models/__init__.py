"""psc.models: the PmSCn convolution, its registry, and backbones built on it.

Public API (other parts of psc depend on these names):
``PmSCn``, ``make_conv``, ``build_model``, ``list_models``, ``replace_conv3d``,
``decompose_conv3d``.
"""

from . import densenet3d, resnet3d, unet3d  # noqa: F401  (register the backbones)
from .complexity import Complexity, count_parameters, macs_per_output_voxel, measure, receptive_field
from .conv_registry import STANDARD_CONVS, ConvBuilder, make_conv
from .decompose import SeparableConv3d, decompose_conv3d
from .fusion import ConvReLU3d, fuse_for_inference
from .model_registry import build_model, list_models, model_defaults, register_model
from .pmscn import PmSCn, subspace_width
from .surgery import ReplacementReport, replace_conv3d

__all__ = [
    "PmSCn", "subspace_width", "make_conv", "ConvBuilder", "STANDARD_CONVS",
    "build_model", "list_models", "register_model", "model_defaults",
    "replace_conv3d", "ReplacementReport", "decompose_conv3d", "SeparableConv3d",
    "Complexity", "count_parameters", "macs_per_output_voxel", "receptive_field", "measure",
    "fuse_for_inference", "ConvReLU3d",
]
