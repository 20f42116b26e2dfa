"""Helpers shared by the network families."""
from __future__ import annotations

# insightface normalizes aligned faces to [-1, 1]
FACE_MEAN = FACE_STD = (0.5, 0.5, 0.5)


def check_embedding_only(name: str, num_classes: int) -> None:
    """Face backbones end in an embedding; identities are classified by the task's margin head."""
    if num_classes:
        raise ValueError(
            f"{name}: num_classes must be 0 (a face backbone outputs an embedding; the identity "
            f"classifier is the face task's margin head), got {num_classes}"
        )
