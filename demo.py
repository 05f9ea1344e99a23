"""Person search demo: find a query person in gallery images and draw what the model sees.

    python demo.py --cfg CONFIG --ckpt CHECKPOINT                      # synthetic data
    python demo.py --cfg CONFIG --ckpt CHECKPOINT --query q.jpg --query-box X1 Y1 X2 Y2 \
                   --gallery g1.jpg g2.jpg ... [--out demo_imgs/out]

Works with single-model checkpoints (teacher or baseline) and distilled students alike: only
the student is built and loaded, no teacher is needed. With no image arguments, the query and
gallery images come from the configured dataset (DATA_ROOT), e.g. the synthetic data of the
quickstart. For every gallery image, all detections are drawn with their similarity to the query;
the best match over the whole gallery is drawn thick and green, and a legend explains the colours.
When the pictures come from the dataset, its ground truth says whether the best match is the
query's identity (its box overlaps one of that person's boxes by IoU >= 0.5); the demo prints it,
writes it under the pictures and into demo.json.

The query box and every image are checked before the model is loaded: a box must lie inside the
query image with x1 < x2 and y1 < y2.
"""
import argparse
import os
from dataclasses import dataclass
from typing import List

import utils.runtime_env  # noqa: F401  (before torch: passive OpenMP waits, freed memory kept)

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.ops import boxes as box_ops

from configs import load_config
from engine.build import build_eval_model
from utils.boxes import box_outside_image
from utils.drawing import draw_box, font_for, legend_strip, side_by_side
from utils.errors import UserError, run_main
from utils.misc import atomic_write_json, resolve_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="config file (YAML) the checkpoint was trained with")
    p.add_argument("--ckpt", required=True, help="checkpoint: single model or distilled student")
    p.add_argument("--query", help="query image")
    p.add_argument("--query-box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"),
                   help="the query person's box in the query image, in pixels")
    p.add_argument("--gallery", nargs="+", help="gallery images to search")
    p.add_argument("--out", default="demo_imgs/out", help="folder for the annotated pictures")
    p.add_argument("--num-gallery", type=int, default=4, help="gallery images taken from the dataset")
    p.add_argument("--det-thresh", type=float, default=0.5,
                   help="draw and rank detections from this person score on (the search protocol's 0.5)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if (args.query is None) != (args.gallery is None) or (args.query and args.query_box is None):
        p.error("give --query, --query-box and --gallery together, or none of them")
    return args


class DemoInputError(UserError):
    """A query box or picture the demo cannot use."""


class DemoImageNotFoundError(DemoInputError, FileNotFoundError):
    """A picture given to the demo does not exist."""


@dataclass
class GroundTruth:
    """The query's identity and, per gallery image, the boxes of that identity (dataset only)."""

    pid: int
    boxes: List[np.ndarray]


def dataset_example(cfg, num_gallery):
    """A query from the configured dataset, gallery images that include its true matches, and
    the ground truth of the query's identity in them."""
    from datasets import build_dataset

    cache = cfg.INPUT.ANNOTATION_CACHE_DIR
    query_set = build_dataset(cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT, None, "query", cache_dir=cache)
    gallery_set = build_dataset(cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT, None, "gallery", cache_dir=cache)
    q = query_set.annotations[0]
    pid = int(q["pids"][0])
    holding = [a for a in gallery_set.annotations if a["img_name"] != q["img_name"] and pid in a["pids"]]
    others = [a for a in gallery_set.annotations if a["img_name"] != q["img_name"] and pid not in a["pids"]]
    chosen = (holding[: max(1, num_gallery // 2)] + others)[:num_gallery]
    truth = GroundTruth(pid, [np.asarray(a["boxes"], np.float32)[np.asarray(a["pids"]) == pid] for a in chosen])
    return q["img_path"], q["boxes"][0].astype(np.float32), [a["img_path"] for a in chosen], truth


def load_image(path):
    if not os.path.isfile(path):
        raise DemoImageNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:  # PIL raises several types for a file that is not a picture
        raise DemoInputError(f"cannot read image {path}: {err}") from None


def check_query_box(box, image, path):
    """The query box must be finite, non-empty (x1 < x2, y1 < y2) and inside the query image."""
    problem = box_outside_image(box, *image.size, "--query-box", path)
    if problem:
        raise DemoInputError(problem)


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


@torch.no_grad()
def search(model, device, query_image, query_box, gallery_images, det_thresh=0.5):
    q_target = {"boxes": torch.as_tensor(query_box, dtype=torch.float32).reshape(1, 4).to(device)}
    q_feat = model([to_tensor(query_image).to(device)], [q_target])[0].reshape(-1)
    results = []
    for image in gallery_images:
        out = model([to_tensor(image).to(device)])[0]
        keep = out["scores"] >= det_thresh
        out = {k: v[keep] for k, v in out.items()}
        sims = out["embeddings"] @ q_feat if len(out["boxes"]) else torch.zeros(0)
        results.append((out["boxes"].cpu().numpy(), out["scores"].cpu().numpy(), sims.cpu().numpy()))
    return results


QUERY, BEST, OTHER, TRUTH = (255, 200, 0), (0, 200, 0), (220, 40, 40), (40, 110, 255)
IOU_SAME_PERSON = 0.5  # the search protocols' overlap for a correct match


def best_match(results):
    """(gallery image, detection) of the highest similarity over the gallery, or None."""
    return max(((i, j) for i, (_, _, s) in enumerate(results) for j in range(len(s))),
               key=lambda ij: results[ij[0]][2][ij[1]], default=None)


def identity_verdict(results, best, truth):
    """(same identity?, IoU) of the best match with the query identity's boxes, or (None, None)
    without ground truth (your own pictures) or without a match."""
    if truth is None or best is None:
        return None, None
    i, j = best
    gt = truth.boxes[i]
    if not len(gt):
        return False, 0.0
    iou = float(box_ops.box_iou(torch.as_tensor(results[i][0][j:j + 1]), torch.as_tensor(gt)).max())
    return iou >= IOU_SAME_PERSON, iou


def verdict_text(same, iou, truth):
    if same is None:
        return "identity of the best match: unknown (no ground truth for these pictures)"
    if same:
        return f"the best match IS the query's identity (pid {truth.pid}; IoU {iou:.2f} with its box)"
    return f"the best match is NOT the query's identity (pid {truth.pid}; best IoU with its boxes {iou:.2f})"


def draw(query_image, query_box, gallery_images, results, out_dir, truth=None, verdict=""):
    os.makedirs(out_dir, exist_ok=True)
    best = best_match(results)
    font = font_for(max(im.height for im in [query_image, *gallery_images]))
    q = query_image.copy()
    draw_box(ImageDraw.Draw(q), query_box, QUERY, 3, "query", font)
    paths = [os.path.join(out_dir, "query.jpg")]
    q.save(paths[0])
    for i, (image, (boxes, _, sims)) in enumerate(zip(gallery_images, results)):
        g = image.copy()
        d = ImageDraw.Draw(g)
        if truth is not None:
            for box in truth.boxes[i]:
                draw_box(d, box, TRUTH, 1)
        for j in np.argsort(sims):  # best last, so it is drawn on top
            is_best = best == (i, int(j))
            draw_box(d, boxes[j], BEST if is_best else OTHER, 4 if is_best else 2,
                     f"{'best ' if is_best else ''}{sims[j]:.2f}", font)
        path = os.path.join(out_dir, f"gallery_{i}.jpg")
        g.save(path)
        paths.append(path)
    # one overview picture: the query, then the gallery images, side by side, the legend below
    tiles = [Image.open(p) for p in paths]
    entries = [(QUERY, "query box"), (BEST, "best match over the gallery, with its similarity to the query"),
               (OTHER, "other detections, with their similarity")]
    if truth is not None:
        entries.append((TRUTH, "ground truth: the query's identity"))
    width = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
    overview = os.path.join(out_dir, "demo.jpg")
    side_by_side(tiles, 8, legend_strip(width, entries, [verdict] if verdict else [], font)).save(overview)
    return overview, paths, best


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.cfg, args.opts)
    truth = None
    if args.query is None:
        query_path, query_box, gallery_paths, truth = dataset_example(cfg, args.num_gallery)
    else:
        query_path, query_box, gallery_paths = args.query, np.asarray(args.query_box, np.float32), args.gallery
    # the pictures and the box are checked before the model is loaded
    query_image = load_image(query_path)
    gallery_images = [load_image(p) for p in gallery_paths]
    if args.query is not None:
        check_query_box(query_box, query_image, query_path)
    device = resolve_device(cfg.DEVICE)
    model, info = build_eval_model(cfg, args.ckpt, device)
    results = search(model, device, query_image, query_box, gallery_images, args.det_thresh)
    same, iou = identity_verdict(results, best_match(results), truth)
    verdict = verdict_text(same, iou, truth)
    overview, paths, best = draw(query_image, query_box, gallery_images, results, args.out, truth, verdict)
    print(f"query {query_path} box {[round(float(v), 1) for v in query_box]}")
    summary = {"query": query_path, "query_box": [float(v) for v in query_box], "checkpoint": args.ckpt,
               "det_thresh": args.det_thresh, "gallery": [], "best_match": None, "same_identity": same,
               "iou_with_query_identity": iou}
    for path, (boxes, scores, sims) in zip(gallery_paths, results):
        top = f"best similarity {sims.max():.3f}" if len(sims) else "no detection"
        print(f"  {path}: {len(boxes)} detections, {top}")
        summary["gallery"].append({"image": path, "detections": len(boxes),
                                   "best_similarity": float(sims.max()) if len(sims) else None})
    if best is not None:
        box = [round(float(v), 1) for v in results[best[0]][0][best[1]]]
        similarity = float(results[best[0]][2][best[1]])
        print(f"best match: {gallery_paths[best[0]]} (similarity {similarity:.3f}, box {box})")
        summary["best_match"] = {"image": gallery_paths[best[0]], "box": box, "similarity": similarity}
    print(verdict)
    atomic_write_json(os.path.join(args.out, "demo.json"), summary)
    print(f"pictures written to {args.out} (overview: {overview}; summary: {os.path.join(args.out, 'demo.json')})")
    return overview


if __name__ == "__main__":
    run_main(main)
