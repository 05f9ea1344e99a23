"""A trivial person-search baseline: ground-truth boxes + colour-histogram embeddings.

It needs no training and no network, so the quickstart can show the whole data and evaluation
path (readers -> raw outputs -> protocols -> metrics) before any model exists. Each box is split
into an upper and a lower half (top and bottom clothing), each half gets a joint RGB histogram,
and the concatenation is L2-normalised. Detection is perfect by construction (the boxes are the
ground truth): only the search numbers say something.
"""
import numpy as np
from PIL import Image

from engine.raw_outputs import RawOutputs


def box_histograms(image, boxes, bins=4):
    """(n, 2 * bins^3) L2-normalised colour histograms of the upper and lower half of each box."""
    img = np.asarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    quant = (img.astype(np.int64) * bins // 256)
    codes = (quant[..., 0] * bins + quant[..., 1]) * bins + quant[..., 2]
    feats = np.zeros((len(boxes), 2 * bins**3), dtype=np.float32)
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=np.float64)):
        x1, x2 = int(max(0, np.floor(x1))), int(min(w, np.ceil(x2)))
        y1, y2 = int(max(0, np.floor(y1))), int(min(h, np.ceil(y2)))
        if x2 <= x1 or y2 <= y1:
            continue
        # skip the head (top 20%): clothing identifies a person, the head rarely does
        top = y1 + (y2 - y1) // 5
        mid = (top + y2) // 2
        for part, (a, b) in enumerate(((top, mid), (mid, y2))):
            if b > a:
                feats[i, part * bins**3:(part + 1) * bins**3] = np.bincount(
                    codes[a:b, x1:x2].ravel(), minlength=bins**3
                )
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def raw_outputs(gallery_dataset, query_dataset):
    """The raw-output dict of SPEC 10 for the histogram baseline on the given splits."""
    gallery_dets, gallery_feats = [], []
    by_name = {}
    for idx, ann in enumerate(gallery_dataset.annotations):
        boxes = ann["boxes"].astype(np.float32)
        with Image.open(ann["img_path"]) as im:
            feats = box_histograms(im.convert("RGB"), boxes)
        gallery_dets.append(np.concatenate([boxes, np.ones((len(boxes), 1), np.float32)], axis=1))
        gallery_feats.append(feats)
        by_name[ann["img_name"]] = idx
    query_box_feats, query_dets, query_feats = [], [], []
    for ann in query_dataset.annotations:
        qbox = ann["boxes"][:1].astype(np.float32)
        with Image.open(ann["img_path"]) as im:
            im = im.convert("RGB")
            qfeat = box_histograms(im, qbox)
            # the query image as a gallery (CBGM): its own people, the query first
            others = np.zeros((0, 4), np.float32)
            if ann["img_name"] in by_name:
                gboxes = gallery_dets[by_name[ann["img_name"]]][:, :4]
                same = np.all(np.abs(gboxes - qbox) < 1e-3, axis=1)
                others = gboxes[~same]
            ofeats = box_histograms(im, others)
        boxes = np.concatenate([qbox, others])
        query_box_feats.append(qfeat)
        query_dets.append(np.concatenate([boxes, np.ones((len(boxes), 1), np.float32)], axis=1))
        query_feats.append(np.concatenate([qfeat, ofeats]))
    return RawOutputs(gallery_dets, gallery_feats, query_dets, query_feats, query_box_feats)
