"""Running an exported model (models/export.py) and comparing it with the model it came from.

``load_exported(format, *paths)`` gives an ``ExportedModel``: ``gallery(image)`` -> (boxes,
scores, embeddings) and ``query(image, box)`` -> embedding, as numpy arrays, from the TorchScript
file (torch.jit.load) or the two ONNX files (onnxruntime on the CPU).

``compare_exported(model, exported, sizes)`` runs both on random images of the given sizes and a
query box in each, and reports per size: the number of detections of each, the largest
difference of boxes (pixels), scores and embeddings, and whether a query ranks the detections in
the same order. ``PARITY_TOLERANCE`` is what the tests require.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ExportedModel", "PARITY_TOLERANCE", "compare_exported", "load_exported", "reference_outputs"]

# largest differences accepted between an export and the eager model (float32 arithmetic in
# another order: TorchScript is bit-identical in practice, ONNX Runtime fuses and reorders)
PARITY_TOLERANCE = {"box_px": 0.05, "score": 1e-4, "embedding": 1e-4}


@dataclass
class ExportedModel:
    gallery: Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray, np.ndarray]]
    query: Callable[[np.ndarray, np.ndarray], np.ndarray]


def load_exported(fmt: str, path: str, query_path: str = None) -> ExportedModel:
    if fmt == "torchscript":
        module = torch.jit.load(path, map_location="cpu")

        def gallery(image):
            with torch.no_grad():
                return tuple(t.numpy() for t in module(torch.from_numpy(image)))

        def query(image, box):
            with torch.no_grad():
                return module.embed_query(torch.from_numpy(image), torch.from_numpy(box)).numpy()

        return ExportedModel(gallery, query)
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # the exporter's shape hints are not errors
        g = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        q = onnxruntime.InferenceSession(query_path, options, providers=["CPUExecutionProvider"])
        return ExportedModel(lambda image: tuple(g.run(None, {"image": image})),
                             lambda image, box: q.run(None, {"image": image, "box": box})[0])
    raise ValueError(f"unknown export format {fmt!r}: torchscript or onnx")


@torch.no_grad()
def reference_outputs(model, image: torch.Tensor, box: torch.Tensor):
    """What the exported pipelines must give, from the eager model."""
    det = model.eval()([image])[0]
    emb = F.normalize(det["embeddings"], dim=1)
    query = F.normalize(model([image], [{"boxes": box}])[0], dim=1)
    return det["boxes"].numpy(), det["scores"].numpy(), emb.numpy(), query.numpy()


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if a.size else 0.0


def compare_exported(model, exported: ExportedModel, sizes: Sequence[Tuple[int, int]], seed: int = 0) -> List[Dict]:
    rows = []
    for i, (h, w) in enumerate(sizes):
        gen = torch.Generator().manual_seed(seed + i)
        image = torch.rand(3, int(h), int(w), generator=gen)
        box = torch.tensor([[w * 0.3, h * 0.2, w * 0.55, h * 0.85]], dtype=torch.float32)
        boxes, scores, emb, query = reference_outputs(model, image, box)
        e_boxes, e_scores, e_emb = exported.gallery(image.numpy())
        e_query = exported.query(image.numpy(), box.numpy())
        row = {"size": [int(h), int(w)], "detections": len(boxes), "detections_exported": len(e_boxes),
               "query_embedding": _max_abs(query, e_query)}
        if len(boxes) == len(e_boxes):
            row.update(boxes_px=_max_abs(boxes, e_boxes), scores=_max_abs(scores, e_scores),
                       embeddings=_max_abs(emb, e_emb),
                       same_ranking=bool(np.array_equal(np.argsort(-(emb @ query[0]), kind="stable"),
                                                        np.argsort(-(e_emb @ e_query[0]), kind="stable"))))
        rows.append(row)
    return rows
