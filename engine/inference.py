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
from engine.raw_outputs import RawOutputs
from utils.dist import gather_objects, is_main_process
from utils.misc import autocast, move_to_device


def _to_numpy(t):
    return t.detach().float().cpu().numpy()


def _feature_rows(embeddings, n):
    """n x D float32 embeddings (also when n is 0, where reshape(0, -1) cannot infer D)."""
    feats = _to_numpy(embeddings)
    return feats.reshape(n, feats.shape[-1] if feats.ndim == 2 else -1)


def _batches(loader):
    """The dataset indices of each batch `loader` yields, in its order (its batch sampler:
    InferenceBatchSampler for the test loaders, or any unshuffled DataLoader's)."""
    sampler = getattr(loader, "batch_sampler", None)
    if sampler is None:
        raise ValueError("inference needs a DataLoader with a batch sampler (batch_size set, not None)")
    return [list(b) for b in sampler]


def _gallery_forward(model, images, targets, device, use_gt):
    if not use_gt:
        return model(images)
    # Upper bound: the ground-truth boxes are the detections, each with score 1.
    embeddings = model(images, targets)
    return [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"]), device=device), "embeddings": e}
            for t, e in zip(targets, embeddings)]


def _run_split(model, loader, device, amp, progress, desc, forward):
    """{dataset index: (dets n x 5, feats n x D)} for this process's images of one split."""
    out = {}
    batches = _batches(loader)
    bar = tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True, mininterval=progress_interval())
    for indices, (images, targets) in zip(batches, bar):
        images, targets = move_to_device(images, targets, device)
        with autocast(device, amp):
            outputs = forward(images, targets)
        if len(outputs) != len(indices):
            raise RuntimeError(f"{desc}: {len(outputs)} outputs for a batch of {len(indices)} images")
        for index, o in zip(indices, outputs):
            boxes = _to_numpy(o["boxes"]).reshape(-1, 4)
            scores = _to_numpy(o["scores"]).reshape(-1, 1)
            out[index] = (np.concatenate([boxes, scores], axis=1).astype(np.float32),
                          _feature_rows(o["embeddings"], len(boxes)))
    return out


def _in_dataset_order(parts, n, split):
    """Merge the per-process outputs of a split into lists in dataset order."""
    merged = {}
    for part in parts:
        merged.update(part)
    if sorted(merged) != list(range(n)):
        raise RuntimeError(f"{split}: outputs for {len(merged)} of {n} images (each image must be run once)")
    return [merged[i][0] for i in range(n)], [merged[i][1] for i in range(n)]


@torch.no_grad()
def run_inference(model, gallery_loader, query_loader, device, use_gt=False, amp="none", progress=True):
    """The RawOutputs (numpy arrays, dataset order) of `model` on the gallery and query splits.

    Distributed, every process runs its share of the images (its loaders' batch samplers) and
    the outputs are gathered on process 0, which alone gets the dict; the others get None."""
    was_training = model.training
    model.eval()
    main = is_main_process()
    try:
        gallery = _run_split(model, gallery_loader, device, amp, progress and main, "gallery",
                             lambda images, targets: _gallery_forward(model, images, targets, device, use_gt))
        query = _run_split(model, query_loader, device, amp, progress and main, "query",
                           lambda images, targets: model(images, targets, query_img_as_gallery=True))
    finally:
        model.train(was_training)
    gallery_parts, query_parts = gather_objects(gallery), gather_objects(query)
    if not main:
        return None
    gallery_dets, gallery_feats = _in_dataset_order(gallery_parts, len(gallery_loader.dataset), "gallery")
    query_dets, query_feats = _in_dataset_order(query_parts, len(query_loader.dataset), "query")
    # row 0 of a query image's outputs is the query box itself (module docstring)
    return RawOutputs(gallery_dets, gallery_feats, query_dets, query_feats, [f[:1].copy() for f in query_feats])


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
