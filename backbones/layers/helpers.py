"""Small helpers shared by the layers and models."""
from __future__ import annotations


def to_pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` from one int (square) or a pair; the sizes, kernels and partitions of every model."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
