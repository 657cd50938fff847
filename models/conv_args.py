"""Conv3d's stride, kernel and padding arguments as three ints, for the layers that
stand in for a Conv3d (cakes.py, jfd.py): they accept what nn.Conv3d accepts, so
``replace_conv3d`` can hand them a Conv3d's own arguments."""

from __future__ import annotations

from typing import Sequence


def triple(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{what}: expected an int or three ints, got {value}")
    return value  # type: ignore[return-value]


def resolve_padding(padding, kernel: tuple[int, int, int]) -> tuple[int, int, int]:
    """Conv3d's padding (int, three ints, "same", "valid", None = same) as three ints."""
    if padding is None or padding == "same":
        return tuple(k // 2 for k in kernel)  # type: ignore[return-value]
    if padding == "valid":
        return (0, 0, 0)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, three ints, 'same' or 'valid', got {padding!r}")
    pad = triple(padding, "padding")
    if any(p < 0 for p in pad):
        raise ValueError(f"padding must be non-negative, got {pad}")
    return pad
