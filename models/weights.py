"""Weights as records (torchvision's ``Weights`` idea): a ``.pt`` state dict with a
JSON model card beside it, and the card's sha256 checked on every load.

The card says everything needed to use the weights correctly (backbone, conv type,
options, labels, orientation, spacing, normalisation) and where they came from
(training data and its terms, validation metrics, command).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from psc.utils.errors import InputError
from psc.utils.files import atomic_write

from .model_registry import build_model


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

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelCard":
        data = json.loads(Path(path).read_text())
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
    card.parameters = sum(p.numel() for p in model.parameters())
    card.sha256 = sha256_of(path)
    text = json.dumps(asdict(card), indent=2, default=list) + "\n"
    atomic_write(card_path(path), lambda tmp: Path(tmp).write_text(text))
    return card


class WeightsError(InputError):
    """Weights that cannot be used as asked: missing, corrupt, or of another kind."""


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Build the card's model and load the weights, refusing a file whose sha256
    differs from the card's (truncated download, wrong file)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    cpath = card_path(path)
    if not cpath.is_file():
        raise WeightsError(f"model card not found beside the weights: {cpath}")
    card = ModelCard.from_json(cpath)
    actual = sha256_of(path)
    if card.sha256 and actual != card.sha256:
        raise WeightsError(f"sha256 of {path.name} is {actual[:12]}..., the card says {card.sha256[:12]}...")
    model = card.build()
    state = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), card
