"""Dataset transforms (SPEC 3): to tensor in [0, 1]; training adds a horizontal flip (p = 0.5).

Every transform is a callable ``(image, target) -> (image, target)``. Resizing and mean/std
normalisation happen inside the model (GeneralizedRCNNTransform), not here.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ["Compose", "ToTensor", "RandomHorizontalFlip", "build_transforms", "to_tensor", "flip_boxes"]


def to_tensor(image) -> torch.Tensor:
    """PIL image / HxWx3 uint8 array -> float32 tensor 3 x H x W in [0, 1]."""
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, Image.Image) and image.mode != "RGB":
        image = image.convert("RGB")
    arr = np.array(image, dtype=np.uint8)  # an RGB image is not converted (copied) again
    if arr.ndim == 2:
        arr = arr[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return tensor.to(torch.float32).div_(255.0)


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror x1 y1 x2 y2 boxes in an image of the given width: x1' = W - x2, x2' = W - x1."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


class Compose:
    def __init__(self, transforms: List[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target: Dict) -> Tuple[torch.Tensor, Dict]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class ToTensor:
    def __call__(self, image, target: Dict):
        return to_tensor(image), target

    def __repr__(self) -> str:
        return "ToTensor()"


class RandomHorizontalFlip:
    """Flip a 3 x H x W tensor and its target boxes with probability ``prob`` (torch RNG)."""

    def __init__(self, prob: float = 0.5):
        self.prob = float(prob)

    def __call__(self, image: torch.Tensor, target: Dict):
        if torch.rand(()).item() < self.prob:
            image = image.flip(-1)
            if "boxes" in target:
                target = dict(target)
                target["boxes"] = flip_boxes(target["boxes"], image.shape[-1])
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(prob={self.prob})"


def build_transforms(is_train: bool) -> Compose:
    transforms: List[Callable] = [ToTensor()]
    if is_train:
        transforms.append(RandomHorizontalFlip(0.5))
    return Compose(transforms)
