"""Run a person-search model over the test splits and collect its raw outputs.

The outputs are exactly what the protocols in `engine.evaluation` consume and what
`OUTPUT_DIR/eval_cache.pth` stores (SPEC 10):
- `gallery_dets`: per gallery image (dataset order), an n x 5 float32 array x1, y1, x2, y2, score;
- `gallery_feats`: per gallery image, n x 256 embeddings (confidence-weighted, SPEC 4);
- `query_dets` / `query_feats`: per query image, the detections of the query image used as a
  gallery (CBGM), the query's own box first with score 1;
- `query_box_feats`: per query, the 1 x 256 embedding of the query box.

One forward per query image gives both the query box embedding and the query-image detections:
the query box is forced first, embedded by the same RoIAlign -> reid_head -> embedding path as in
query mode and without confidence weighting, so row 0 *is* the query embedding.
"""
import hashlib

import numpy as np
import torch
from tqdm import tqdm

from engine.trainer import progress_interval
from utils.misc import autocast, move_to_device


def _to_numpy(t):
    return t.detach().float().cpu().numpy()


def _feature_rows(embeddings, n):
    """n x D float32 embeddings (also when n is 0, where reshape(0, -1) cannot infer D)."""
    feats = _to_numpy(embeddings)
    return feats.reshape(n, feats.shape[-1] if feats.ndim == 2 else -1)


@torch.no_grad()
def run_inference(model, gallery_loader, query_loader, device, use_gt=False, amp="none", progress=True):
    """Return the raw outputs dict (numpy arrays) of `model` on the gallery and query splits."""
    was_training = model.training
    model.eval()
    gallery_dets, gallery_feats = [], []
    for images, targets in tqdm(gallery_loader, desc="gallery", disable=not progress, dynamic_ncols=True,
                                 mininterval=progress_interval()):
        images, targets = move_to_device(images, targets, device)
        with autocast(device, amp):
            if use_gt:
                # Upper bound: the ground-truth boxes are the detections, each with score 1.
                embeddings = model(images, targets)
                outputs = [
                    {"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"]), device=device), "embeddings": e}
                    for t, e in zip(targets, embeddings)
                ]
            else:
                outputs = model(images)
        for out in outputs:
            boxes = _to_numpy(out["boxes"]).reshape(-1, 4)
            scores = _to_numpy(out["scores"]).reshape(-1, 1)
            gallery_dets.append(np.concatenate([boxes, scores], axis=1).astype(np.float32))
            gallery_feats.append(_feature_rows(out["embeddings"], len(boxes)))

    query_dets, query_feats, query_box_feats = [], [], []
    for images, targets in tqdm(query_loader, desc="query", disable=not progress, dynamic_ncols=True,
                                 mininterval=progress_interval()):
        images, targets = move_to_device(images, targets, device)
        with autocast(device, amp):
            outputs = model(images, targets, query_img_as_gallery=True)
        for out in outputs:
            boxes = _to_numpy(out["boxes"]).reshape(-1, 4)
            scores = _to_numpy(out["scores"]).reshape(-1, 1)
            feats = _feature_rows(out["embeddings"], len(boxes))
            query_dets.append(np.concatenate([boxes, scores], axis=1).astype(np.float32))
            query_feats.append(feats)
            query_box_feats.append(feats[:1].copy())
    model.train(was_training)
    return {
        "gallery_dets": gallery_dets,
        "gallery_feats": gallery_feats,
        "query_dets": query_dets,
        "query_feats": query_feats,
        "query_box_feats": query_box_feats,
    }


_TRAINING_ONLY_PREFIXES = ("roi_heads.reid_loss.",)


def model_fingerprint(model):
    """A SHA-256 of the model's weights and buffers: what identifies the model behind a cache.

    It is independent of where the checkpoint file lives, so a moved checkpoint still matches its
    cache while a retrained one (same path, new weights) does not. The OIM tables are left out:
    they only serve the training loss and never change what inference computes.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(_TRAINING_ONLY_PREFIXES):
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
