"""Test-time batching (INPUT.BATCH_SIZE_TEST): speed and how far the outputs move from batch 1.

Images of a batch are padded to a common size (the largest in the batch, rounded up to 32):
the convolutions near the border of a padded image then see zeros instead of nothing, which
moves its features, boxes and scores a little. The test loaders sort images by aspect ratio so
that a batch pads little. This tool runs a model over --images images of random sizes and
aspect ratios (the synthetic pictures, resized), once one image a batch and once --batch images
a batch through the same loaders as `--eval`, and reports images/s and the largest differences
(boxes in pixels, scores, embedding cosine) between each batch-1 detection and the batched
detection that overlaps it most.

    python tools/bench_batched_inference.py [--cfg FILE] [--ckpt FILE] [--batch 4] [--images 24]
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils.runtime_env  # noqa: F401,E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from configs import load_config  # noqa: E402
from datasets.loaders import InferenceBatchSampler, collate_fn  # noqa: E402
from datasets.transforms import build_transforms  # noqa: E402
from models import build_model  # noqa: E402


class _Pictures(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.annotations = [{"img_path": p} for p in paths]
        self.transforms = build_transforms(False)

    def __len__(self):
        return len(self.annotations)

    def __getitem__(self, i):
        with Image.open(self.annotations[i]["img_path"]) as img:
            img = img.convert("RGB")
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "img_name": str(i)}
        return self.transforms(img, target)


def _pictures(folder, n, seed, same_size=False):
    from tools.make_synthetic import generate

    world = os.path.join(folder, "world")
    generate(world, seed, datasets=["PRW"], test_images=max(n, 8), train_images=2, train_ids=1, test_ids=4)
    frames = sorted(os.listdir(os.path.join(world, "PRW", "frames")))[:n]
    rng = np.random.default_rng(seed)
    paths = []
    for k, name in enumerate(frames):
        with Image.open(os.path.join(world, "PRW", "frames", name)) as img:
            w = int(rng.integers(480, 1600))
            h = int(w / rng.uniform(0.6, 2.0))
            path = os.path.join(folder, f"{k}.jpg")
            (img if same_size else img.resize((w, h))).save(path, quality=92)
            paths.append(path)
    return paths


@torch.no_grad()
def _run(model, dataset, batch):
    loader = DataLoader(dataset, batch_sampler=InferenceBatchSampler(dataset, batch), collate_fn=collate_fn)
    outputs = {}
    start = time.perf_counter()
    for indices, (images, _targets) in zip(loader.batch_sampler.batches, loader):
        for i, out in zip(indices, model(list(images))):
            outputs[i] = out
    return outputs, time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default=os.path.join(ROOT, "configs", "cuhk_sysu", "resnet18", "base.yaml"),
                   help="model config (default: the CUHK-SYSU ResNet-18 baseline at 900 x 1500)")
    p.add_argument("--ckpt", help="weights (default: random, ImageNet weights not needed)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--same-size", action="store_true", help="keep the pictures at one size (nothing to pad)")
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    cfg = load_config(args.cfg, ["BASELINE.BACKBONE_PRETRAIN", "False", *args.opts])
    torch.manual_seed(args.seed)
    model = build_model(cfg).eval()
    if args.ckpt:
        from models.checkpoint import load_checkpoint_file, load_model_weights

        load_model_weights(model, load_checkpoint_file(args.ckpt))
    with tempfile.TemporaryDirectory() as folder:
        dataset = _Pictures(_pictures(folder, args.images, args.seed, args.same_size))
        _run(model, dataset, 1)  # warm-up (allocator, kernels)
        one, t_one = _run(model, dataset, 1)
        many, t_many = _run(model, dataset, args.batch)
    matched, unmatched, box, score, cos = 0, 0, 0.0, 0.0, 1.0
    for i in one:  # each batch-1 detection against its best-overlapping batched detection
        a, b = one[i], many[i]
        if len(a["boxes"]) == 0 or len(b["boxes"]) == 0:
            unmatched += len(a["boxes"])
            continue
        iou, j = box_iou(a["boxes"], b["boxes"]).max(dim=1)
        ok = iou >= 0.9
        matched += int(ok.sum())
        unmatched += int((~ok).sum())
        if ok.any():
            box = max(box, float((a["boxes"][ok] - b["boxes"][j[ok]]).abs().max()))
            score = max(score, float((a["scores"][ok] - b["scores"][j[ok]]).abs().max()))
            # the embeddings are confidence-weighted (score x unit vector): compare directions
            ea, eb = F.normalize(a["embeddings"][ok], dim=1), F.normalize(b["embeddings"][j[ok]], dim=1)
            cos = min(cos, float((ea * eb).sum(1).min()))
    sizes = "of one size" if args.same_size else "of random sizes and aspect ratios"
    print(f"{len(dataset)} images {sizes}, {cfg.BASELINE.BACKBONE_NAME} at {cfg.INPUT.MIN_SIZE} x "
          f"{cfg.INPUT.MAX_SIZE}, {torch.get_num_threads()} threads, weights {args.ckpt or 'random'}, "
          f"score threshold {cfg.MODEL.ROI_HEAD.SCORE_THRESH_TEST}")
    print(f"batch 1: {len(dataset) / t_one:.2f} images/s; batch {args.batch}: {len(dataset) / t_many:.2f} images/s "
          f"(x{t_one / t_many:.2f})")
    print(f"detections of batch 1 found again (IoU >= 0.9) with batch {args.batch}: {matched} of {matched + unmatched}; "
          f"over those, largest box difference {box:.3g} px, score difference {score:.3g}, "
          f"smallest embedding cosine {cos:.6f}")


if __name__ == "__main__":
    main()
