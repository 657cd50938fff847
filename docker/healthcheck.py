"""The image's HEALTHCHECK: psc imports, torch loads, both shipped models load with
their sha256 checked against their model cards and run one forward pass on CPU, and, where
PSC_REQUIRE_GPU=1 (the compose file's GPU services), torch sees a CUDA device. Prints one line;
exit code 0 when healthy, 1 otherwise."""

from __future__ import annotations

import os
import sys


def main() -> int:
    try:
        import torch

        from psc.app.segment import DEFAULT_WEIGHTS
        from psc.app.segment_em import DEFAULT_EM_WEIGHTS
        from psc.models.weights import load_weights

        for path, size in ((DEFAULT_WEIGHTS, 32), (DEFAULT_EM_WEIGHTS, 48)):
            model, card = load_weights(path)  # raises on a sha256 mismatch
            with torch.no_grad():
                output = model(torch.zeros(1, card.in_channels, size, size, size))
            if output.shape[1] != card.out_channels or not torch.isfinite(output).all():
                raise RuntimeError(f"{path.name}: unexpected output {tuple(output.shape)}")
        if os.environ.get("PSC_REQUIRE_GPU") == "1" and not torch.cuda.is_available():
            raise RuntimeError(f"PSC_REQUIRE_GPU=1 but torch {torch.__version__} sees no CUDA device")
        device = f"cuda x{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    except Exception as error:  # noqa: BLE001 - any failure means unhealthy
        print(f"unhealthy: {type(error).__name__}: {error}")
        return 1
    print(f"healthy: torch {torch.__version__} on {device}; weights {DEFAULT_WEIGHTS.name}, "
          f"{DEFAULT_EM_WEIGHTS.name} verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
