"""The image's HEALTHCHECK: psc imports, torch loads, every shipped model
(``psc.models.shipped.ShippedWeights``) loads with its sha256 and kind checked against its
model card and runs one forward pass on CPU, and, where PSC_REQUIRE_GPU=1 (the compose
file's GPU services), torch sees a CUDA device. Prints one line; exit code 0 when healthy,
1 otherwise."""

from __future__ import annotations

import os
import sys

def main() -> int:
    try:
        import torch

        from psc.models.shipped import ShippedWeights
        from psc.models.weights import EM_AFFINITY, MRI_TISSUE

        sizes = {MRI_TISSUE: 32, EM_AFFINITY: 48}  # a cube each kind takes (the EM U-Net's valid convolutions)
        names = []
        for member in ShippedWeights:
            record = member.value
            model, card = record.load()  # raises on a sha256 or kind mismatch
            size = sizes.get(record.kind, 48)
            with torch.no_grad():
                output = model(torch.zeros(1, card.in_channels, size, size, size))
            if output.shape[1] != card.out_channels or not torch.isfinite(output).all():
                raise RuntimeError(f"{record.file}: unexpected output {tuple(output.shape)}")
            names.append(record.file)
        if os.environ.get("PSC_REQUIRE_GPU") == "1" and not torch.cuda.is_available():
            raise RuntimeError(f"PSC_REQUIRE_GPU=1 but torch {torch.__version__} sees no CUDA device")
        device = f"cuda x{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    except Exception as error:  # noqa: BLE001 - any failure means unhealthy
        print(f"unhealthy: {type(error).__name__}: {error}")
        return 1
    print(f"healthy: torch {torch.__version__} on {device}; weights {', '.join(names)} verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
