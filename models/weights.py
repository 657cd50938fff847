"""Weights as records (torchvision's ``Weights`` idea): a ``.pt`` state dict with a
JSON model card beside it, and the card's sha256 checked on every load.

The card is the weights' contract: what kind of model it is (``kind``: MRI tissue or EM
affinity, checked by every path that loads weights, so an EM model is never run on a
scan), everything needed to use it correctly (backbone, conv type, options, labels,
orientation, spacing, and ``normalisation``, the name of the input transform that
inference *and* training read from here: ``psc.pipelines.mri.preprocess`` and
``psc.pipelines.em.normalise`` hold the functions) and where it came from (training data
and its terms, validation metrics, command). The shipped weights are enumerated in
``psc.models.shipped``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from psc.utils.errors import InputError
from psc.utils.files import atomic_write

from .model_registry import build_model


MRI_TISSUE = "mri-tissue"  # (1, X, Y, Z) T1 in model space -> tissue class logits
EM_AFFINITY = "em-affinity"  # (1, z, y, x) raw -> nearest-neighbour affinities (3 channels)
KINDS = (MRI_TISSUE, EM_AFFINITY)


def infer_kind(backbone: str, out_channels: int) -> str:
    """The kind of a card written before cards said it: the only EM models psc has made
    are 3-channel affinity U-Nets."""
    return EM_AFFINITY if backbone == "unet3d" and out_channels == 3 else MRI_TISSUE


@dataclass
class ModelCard:
    backbone: str
    conv: str
    options: dict
    in_channels: int
    out_channels: int
    task: str = ""
    labels: dict = field(default_factory=dict)
    orientation: str = "RAS"
    spacing: tuple = (1.0, 1.0, 1.0)
    normalisation: str = "zscore-nonzero"
    parameters: int = 0
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    sha256: str = ""
    kind: str = ""  # MRI_TISSUE or EM_AFFINITY; filled in from the architecture when empty

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind = infer_kind(self.backbone, self.out_channels)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelCard":
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError("a model card is a JSON object")
        data["labels"] = {int(k): v for k, v in data.get("labels", {}).items()}
        data["spacing"] = tuple(data.get("spacing", (1.0, 1.0, 1.0)))
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def build(self) -> nn.Module:
        return build_model(self.backbone, conv=self.conv, in_channels=self.in_channels,
                           out_channels=self.out_channels, **self.options)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_weights(model: nn.Module, card: ModelCard, path: str | Path) -> ModelCard:
    """Write ``path`` (.pt state dict, fp32) and its card ``path.json``; returns the card
    with parameters and sha256 filled in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    from .complexity import count_parameters

    card.parameters = count_parameters(model)
    card.sha256 = sha256_of(path)
    text = json.dumps(asdict(card), indent=2, default=list) + "\n"
    atomic_write(card_path(path), lambda tmp: Path(tmp).write_text(text))
    return card


class WeightsError(InputError):
    """Weights that cannot be used as asked: missing, corrupt, or of another kind."""


def read_card(path: str | Path, kind: str | None = None) -> ModelCard:
    """The verified card of weights ``path``: the file exists, its sha256 is the card's
    (a truncated download or a swapped file is refused here, once, not in every worker)
    and, given ``kind``, the card is of that kind. Reads the weights file once to hash
    it, builds nothing."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    cpath = card_path(path)
    if not cpath.is_file():
        raise WeightsError(f"model card not found beside the weights: {cpath}")
    try:
        card = ModelCard.from_json(cpath)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise WeightsError(f"{cpath}: not a readable model card ({type(error).__name__}: {error})") from None
    if card.kind not in KINDS:
        raise WeightsError(f"{cpath.name}: unknown model kind {card.kind!r} (known: {', '.join(KINDS)})")
    if kind is not None and card.kind != kind:
        raise WeightsError(f"{path.name} is an {card.kind} model, not an {kind} model")
    actual = sha256_of(path)
    if card.sha256 and actual != card.sha256:
        raise WeightsError(f"sha256 of {path.name} is {actual[:12]}..., the card says {card.sha256[:12]}...")
    return card


def load_weights(path: str | Path, map_location: str | torch.device = "cpu",
                 kind: str | None = None) -> tuple[nn.Module, ModelCard]:
    """Build the card's model and load the weights, refusing a file whose sha256
    differs from the card's (truncated download, wrong file) or, given ``kind``, a model
    of another kind; weights that do not fit the card's network are refused too."""
    card = read_card(path, kind)
    model = card.build()
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, EOFError, pickle.UnpicklingError) as error:
        text = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise WeightsError(f"{Path(path).name}: weights do not fit the card's {card.backbone}/{card.conv} "
                           f"({text})") from None
    return model.eval(), card
