"""Person search demo: find a query person in gallery images and draw what the model sees.

    python demo.py --cfg CONFIG --ckpt CHECKPOINT                      # synthetic data
    python demo.py --cfg CONFIG --ckpt CHECKPOINT --query q.jpg --query-box X1 Y1 X2 Y2 \
                   --gallery g1.jpg g2.jpg ... [--out demo_imgs/out]

Works with single-model checkpoints (teacher or baseline) and distilled students alike: only
the student is built and loaded, no teacher is needed. With no image arguments, the query and
gallery images come from the configured dataset (DATA_ROOT), e.g. the synthetic data of the
quickstart. For every gallery image, all detections are drawn with their similarity to the query;
the best match over the whole gallery is drawn thick and green.
"""
import argparse
import os
import sys

import utils.runtime_env  # noqa: F401  (before torch: passive OpenMP waits, freed memory kept)

import numpy as np
import torch
from PIL import Image, ImageDraw

from configs import load_config
from engine.build import build_eval_model
from utils.misc import resolve_device


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


def dataset_example(cfg, num_gallery):
    """A query from the configured dataset and gallery images that include its true matches."""
    from datasets import build_dataset

    cache = cfg.INPUT.ANNOTATION_CACHE_DIR
    query_set = build_dataset(cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT, None, "query", cache_dir=cache)
    gallery_set = build_dataset(cfg.INPUT.DATASET, cfg.INPUT.DATA_ROOT, None, "gallery", cache_dir=cache)
    q = query_set.annotations[0]
    pid = int(q["pids"][0])
    holding = [a for a in gallery_set.annotations if a["img_name"] != q["img_name"] and pid in a["pids"]]
    others = [a for a in gallery_set.annotations if a["img_name"] != q["img_name"] and pid not in a["pids"]]
    chosen = (holding[: max(1, num_gallery // 2)] + others)[:num_gallery]
    return q["img_path"], q["boxes"][0].astype(np.float32), [a["img_path"] for a in chosen]


def load_image(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        return im.convert("RGB")


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


def draw(query_image, query_box, gallery_images, results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    best = max(
        ((i, j) for i, (_, _, s) in enumerate(results) for j in range(len(s))),
        key=lambda ij: results[ij[0]][2][ij[1]],
        default=None,
    )
    q = query_image.copy()
    ImageDraw.Draw(q).rectangle([float(v) for v in query_box], outline=(255, 200, 0), width=3)
    paths = [os.path.join(out_dir, "query.jpg")]
    q.save(paths[0])
    for i, (image, (boxes, _, sims)) in enumerate(zip(gallery_images, results)):
        g = image.copy()
        d = ImageDraw.Draw(g)
        for j in np.argsort(sims):  # best last, so it is drawn on top
            is_best = best == (i, int(j))
            colour = (0, 220, 0) if is_best else (230, 40, 40)
            d.rectangle([float(v) for v in boxes[j]], outline=colour, width=4 if is_best else 2)
            d.text((float(boxes[j][0]) + 2, float(boxes[j][1]) + 2), f"{sims[j]:.2f}", fill=colour)
        path = os.path.join(out_dir, f"gallery_{i}.jpg")
        g.save(path)
        paths.append(path)
    # one overview picture: the query, then the gallery images, side by side
    tiles = [Image.open(p) for p in paths]
    height = max(t.height for t in tiles)
    panel = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), height), (255, 255, 255))
    x = 0
    for t in tiles:
        panel.paste(t, (x, 0))
        x += t.width + 8
    overview = os.path.join(out_dir, "demo.jpg")
    panel.save(overview)
    return overview, paths, best


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.cfg, args.opts)
    device = resolve_device(cfg.DEVICE)
    model, info = build_eval_model(cfg, args.ckpt, device)
    if args.query is None:
        query_path, query_box, gallery_paths = dataset_example(cfg, args.num_gallery)
    else:
        query_path, query_box, gallery_paths = args.query, np.asarray(args.query_box, np.float32), args.gallery
    query_image = load_image(query_path)
    gallery_images = [load_image(p) for p in gallery_paths]
    results = search(model, device, query_image, query_box, gallery_images, args.det_thresh)
    overview, paths, best = draw(query_image, query_box, gallery_images, results, args.out)
    print(f"query {query_path} box {[round(float(v), 1) for v in query_box]}")
    for path, (boxes, scores, sims) in zip(gallery_paths, results):
        top = f"best similarity {sims.max():.3f}" if len(sims) else "no detection"
        print(f"  {path}: {len(boxes)} detections, {top}")
    if best is not None:
        print(f"best match: {gallery_paths[best[0]]} (similarity {results[best[0]][2][best[1]]:.3f})")
    print(f"pictures written to {args.out} (overview: {overview})")
    return overview


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
