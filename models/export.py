"""The evaluated model as a file that runs without this code base: TorchScript or ONNX.

What is exported is the whole inference pipeline of one image, as ``model.eval()`` runs it:
transform (resize to MIN_SIZE / MAX_SIZE, normalisation, padding), backbone, FPN, RPN with its
NMS, both heads, the second NMS, and the mapping of boxes back to the input image:

- gallery: ``image (3 x H x W, float32 RGB in [0, 1])`` -> ``boxes (n x 4, x1 y1 x2 y2 in input
  pixels), scores (n), embeddings (n x 256, L2-normalised)``. The model's own gallery
  embeddings are multiplied by the detection score (the protocols' confidence weighting);
  the exported ones are normalised back, so that a cosine similarity is a dot product; multiply
  by ``scores`` to get the weighted ones;
- query: ``image, box (1 x 4)`` -> ``embedding (1 x 256, L2-normalised)`` of that box.

Both are traced (``torch.jit.trace``; the ONNX files are made by the TorchScript-based exporter,
opset 17) from one example image. torchvision's detection code keeps every shape dynamic under
tracing; two places are made trace-safe here, without changing what eager inference computes:

- the resized size: eager PyTorch floors side x (limit / reference side) in float64; a trace of
  torchvision's resize computes it in float32 (and the ONNX exporter turns float64 arithmetic
  into float32), which floors to a size one pixel smaller for many sizes (240 x 200 at MIN_SIZE
  120: 144 x 120 eager, 143 x 119 traced). ``ExportableTransform`` computes it exactly, in
  integers (side x limit // reference side), which is the eager number unless the float64
  product is 1 ulp off across an integer;
- per-image splits of a batch (``models.seqnet.split_per_image``): one image takes all rows.

What does not export: training (losses, sampling, OIM tables), several images per call (the
pipeline takes one image), the CBGM protocol (it needs the query image's own detections: run the
gallery pipeline on the query image) and ``query_img_as_gallery``. See docs/export.md.
"""
from __future__ import annotations

import copy
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

__all__ = ["ExportableTransform", "GalleryPipeline", "QueryPipeline", "exportable", "export_onnx",
           "export_torchscript", "ONNX_OPSET"]

ONNX_OPSET = 17


class ExportableTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform whose resize, when traced, computes the resized size exactly (see
    the module docstring). Outside a trace it is torchvision's resize itself."""

    def resize(self, image, target=None):
        if not torch.jit.is_tracing() or self.training or self.fixed_size is not None:
            return super().resize(image, target)
        h, w = image.shape[-2:]
        # The resized size in integer arithmetic: side x limit // reference side, exact. Eager
        # PyTorch floors the float64 product side x (limit / reference), which is the same
        # number unless a rounding error of 1 ulp crosses an integer; float32 (torchvision's
        # traced path, and what the ONNX exporter makes of float64 arithmetic) crosses often.
        size_in = torch._shape_as_tensor(image)[-2:]
        short, long = torch.minimum(size_in[0], size_in[1]), torch.maximum(size_in[0], size_in[1])
        low, high = int(self.min_size[-1]), int(self.max_size)
        by_short = low * long <= high * short  # the short side reaches MIN_SIZE first
        numerator = torch.where(by_short, short * 0 + low, long * 0 + high)
        denominator = torch.where(by_short, short, long)
        size = torch.div(size_in * numerator, denominator, rounding_mode="floor")
        image = F.interpolate(image[None], size=[size[0], size[1]], mode="bilinear", align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        return image, target


def exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with ``ExportableTransform`` (the same settings)."""
    model = copy.deepcopy(model)
    t = model.transform
    model.transform = ExportableTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                          size_divisible=t.size_divisible, fixed_size=t.fixed_size)
    return model.eval()  # the new transform too: in training mode it would not map boxes back


class GalleryPipeline(nn.Module):
    """image -> (boxes, scores, L2-normalised embeddings) of its detections."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        det = self.model([image])[0]
        return det["boxes"], det["scores"], F.normalize(det["embeddings"], dim=1)


class QueryPipeline(nn.Module):
    """(image, box 1 x 4) -> the 1 x 256 L2-normalised embedding of that box."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, box: Tensor) -> Tensor:
        return F.normalize(self.model([image], [{"boxes": box}])[0], dim=1)


def _examples(example_image: Tensor):
    h, w = example_image.shape[-2:]
    box = torch.tensor([[w * 0.25, h * 0.2, w * 0.6, h * 0.9]], dtype=torch.float32)
    return example_image, box


@torch.no_grad()
def export_torchscript(model: nn.Module, path: str, example_image: Tensor) -> None:
    """One TorchScript file: ``forward(image)`` is the gallery pipeline, ``embed_query(image,
    box)`` the query path (``torch.jit.load(path)``)."""
    model = exportable(model)
    image, box = _examples(example_image)
    both = _Both(GalleryPipeline(model), QueryPipeline(model))
    traced = torch.jit.trace_module(both, {"forward": (image,), "embed_query": (image, box)}, check_trace=False)
    traced.save(path)


class _Both(nn.Module):
    def __init__(self, gallery: GalleryPipeline, query: QueryPipeline):
        super().__init__()
        self.gallery, self.query = gallery, query

    def forward(self, image: Tensor):
        return self.gallery(image)

    def embed_query(self, image: Tensor, box: Tensor) -> Tensor:
        return self.query(image, box)


@torch.no_grad()
def export_onnx(model: nn.Module, path: str, query_path: str, example_image: Tensor) -> None:
    """Two ONNX files: the gallery pipeline (input "image"; outputs "boxes", "scores",
    "embeddings") and the query path (inputs "image", "box"; output "embedding")."""
    model = exportable(model)
    image, box = _examples(example_image)
    hw = {1: "height", 2: "width"}
    n = {0: "detections"}
    torch.onnx.export(GalleryPipeline(model), (image,), path, dynamo=False, opset_version=ONNX_OPSET,
                      input_names=["image"], output_names=["boxes", "scores", "embeddings"],
                      dynamic_axes={"image": hw, "boxes": n, "scores": n, "embeddings": n})
    torch.onnx.export(QueryPipeline(model), (image, box), query_path, dynamo=False, opset_version=ONNX_OPSET,
                      input_names=["image", "box"], output_names=["embedding"], dynamic_axes={"image": hw})
