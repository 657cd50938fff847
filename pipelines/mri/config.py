"""What an MRI model expects and produces; the model card repeats these values, and
training and inference both read them from the card, never from here directly."""

from __future__ import annotations

# IBSR tissue classes, index -> name (BIDS-derivatives dseg.tsv uses these).
LABELS = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}
LABEL_DESCRIPTIONS = {0: "background", 1: "cerebrospinal fluid", 2: "gray matter", 3: "white matter"}
# Each tissue's colour (RGB in [0, 1]) wherever labels are shown: the QC picture
# (pipelines/mri/outputs.py) and the napari plugin, so both show the same thing.
LABEL_COLOURS = {1: (0.15, 0.55, 1.0), 2: (1.0, 0.35, 0.2), 3: (1.0, 0.9, 0.2)}
OTHER_LABEL_COLOUR = (0.6, 0.6, 0.6)  # a label without a colour of its own


def label_colour(index: int) -> tuple[float, float, float]:
    return LABEL_COLOURS.get(index, OTHER_LABEL_COLOUR)

# Model space: RAS+ voxel axes at IBSR's own in-plane/slice resolution (1.5 mm is the
# coronal slice spacing; resampling it finer would invent detail the labels lack).
ORIENTATION = "RAS"
SPACING = (1.0, 1.5, 1.0)
NORMALISATION = "zscore-nonzero"  # z-score over brain voxels (nonzero or --mask)

# The shipped model's architecture (small enough to commit, fast on a 2-core CPU).
BACKBONE = "densenet3d"
BACKBONE_OPTIONS = {"init_channels": 16, "growth_rate": 8, "block_layers": (3, 3, 3, 3), "side_channels": 8}
# The P2SC2 DenseNet with no more parameters than its conv3d twin (issue 13; the paper's
# MRI claim is PmSCn with fewer parameters). psc's width rule turns each 3x3x3
# convolution into two 2D convolutions and a 1D one, so the P2SC2 DenseNet at the MRI
# widths (config.BACKBONE_OPTIONS: 16/8/8) has 821,879 parameters, 1.51x conv3d's
# 544,660. Scaling init_channels, growth_rate and side_channels by one factor, as the
# benchmarks' equal-parameter rows do (benchmarks/inference.py equal_parameters), the
# widest network not above conv3d is x0.79: 13/6/6, 479,726 parameters (0.88x, 12 %
# fewer). The next factor that changes a width (x0.82: 13/7/7) has 610,760.
EQUAL_PARAMETER_OPTIONS = {"init_channels": 13, "growth_rate": 6, "block_layers": (3, 3, 3, 3), "side_channels": 6}
PATCH_SIZE = (64, 64, 64)
# Inference runs a brain crop in one window up to this many model voxels (a 1.0 x 1.5 x
# 1.0 mm adult brain crop is 2.6-3.2 M); larger inputs are tiled into INFERENCE_WINDOW
# windows, so memory stays bounded by the window.
WHOLE_WINDOW_MAX_VOXELS = 200 * 200 * 200
# Inference crops the model-space brain with this many voxels of margin. Outside the
# brain the normalised image is 0, as the network's zero padding is, so a wide margin
# only adds work: measured with the shipped model on IBSR_07 / IBSR_16 (1 thread),
# margin 8 -> 2 changed mean Dice by +0.0019 / -0.0007 and cut the time by 27 % / 17 %
# (docs/mri.md). Training crops keep prepare_case's own margin of 8.
INFERENCE_CROP_MARGIN = 2
INFERENCE_WINDOW = (96, 96, 96)
