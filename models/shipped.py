"""The weights that ship inside the package, one enumerated record each (torchvision's
``WeightsEnum``): the file, its kind, and what it is for. The record's card holds the rest
of the contract (architecture, input normalisation, labels, training data, metrics).

Every part of psc that needs a default model asks here: ``psc-segment`` (MRI and EM), the
napari plugin's Segment widget, the benchmarks and the docker health check. A new
shipped model is one new member.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from torch import nn

from . import weights
from .weights import EM_AFFINITY, MRI_TISSUE, ModelCard, load_weights, read_card

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


@dataclass(frozen=True)
class WeightsRecord:
    file: str  # in PRETRAINED_DIR, with its card (same stem, .json) beside it
    kind: str  # MRI_TISSUE or EM_AFFINITY
    summary: str

    @property
    def path(self) -> Path:
        return PRETRAINED_DIR / self.file

    def card(self) -> ModelCard:
        """The verified card (sha256 and kind checked)."""
        return read_card(self.path, self.kind)

    def load(self, map_location: str = "cpu") -> tuple[nn.Module, ModelCard]:
        return load_weights(self.path, map_location=map_location, kind=self.kind)


class ShippedWeights(Enum):
    MRI_TISSUE = WeightsRecord("mri_densenet3d_p2sc2.pt", MRI_TISSUE,
                               "CSF / gray / white matter of skull-stripped T1 MRI (P2SC2 DenseNet, IBSR)")
    # for scans with voxels coarser than 2 mm (pipelines/mri/default_model.py chooses):
    # equal parameters to conv3d, trained with resolution and intensity augmentation
    # (the kind by its module's name: inside this class MRI_TISSUE is the member above)
    MRI_TISSUE_COARSE = WeightsRecord("mri_densenet3d_p2sc2_coarse.pt", weights.MRI_TISSUE,
                                      "the same labels for scans coarser than 2 mm (P2SC2 DenseNet, 479,726 "
                                      "parameters, robust recipe, all 11 IBSR scans)")
    EM_AFFINITY = WeightsRecord("em_unet3d_p2sc2.pt", EM_AFFINITY,
                                "nearest-neighbour affinities of FIB-SEM neuron boundaries (P2SC2 U-Net, FIB-25 and NeuroProof)")


def default_weights(kind: str) -> WeightsRecord:
    """The shipped record of ``kind`` (``MRI_TISSUE`` or ``EM_AFFINITY``)."""
    for member in ShippedWeights:
        if member.value.kind == kind:
            return member.value
    raise KeyError(f"no shipped weights of kind {kind!r}")
