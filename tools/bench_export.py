"""Speed of the exported pipelines against the eager model, on one image, in one run.

    python tools/bench_export.py [--backbone resnet18x05] [--size 600 800] [--repeats 3] [--threads 2]

Builds the CUHK-SYSU model of the backbone's base.yaml with random weights (INPUT.MIN_SIZE 900 /
MAX_SIZE 1500 as published), exports it to TorchScript and ONNX into a temporary folder, and times
one gallery forward of each (median of --repeats after a warm-up), measured in interleaved rounds
so that a busy machine slows all three alike. Prints a table and the parity of the exports.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from configs import load_config  # noqa: E402
from engine.export_check import compare_exported, load_exported  # noqa: E402
from models import build_model  # noqa: E402
from models.export import export_onnx, export_torchscript  # noqa: E402
from utils.errors import run_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18x05", choices=("resnet50", "resnet18", "resnet18x05", "mobilenetV2"))
    p.add_argument("--size", type=int, nargs=2, default=[600, 800], metavar=("H", "W"), help="input image size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(os.path.join(ROOT, "configs", "cuhk_sysu", args.backbone, "base.yaml"),
                      ["BASELINE.BACKBONE_PRETRAIN", "False"])
    torch.manual_seed(0)
    model = build_model(cfg, role="baseline").eval()
    example = torch.rand(3, cfg.INPUT.MIN_SIZE, cfg.INPUT.MAX_SIZE, generator=torch.Generator().manual_seed(0))
    image = torch.rand(3, *args.size, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: os.path.join(tmp, k) for k in ("m.pt", "m.onnx", "m.query.onnx")}
        export_torchscript(model, paths["m.pt"], example)
        export_onnx(model, paths["m.onnx"], paths["m.query.onnx"], example)
        runners = {"eager": lambda: model([image]),
                   "TorchScript": (lambda ts: lambda: ts.gallery(image.numpy()))(load_exported("torchscript", paths["m.pt"])),
                   "ONNX Runtime": (lambda ox: lambda: ox.gallery(image.numpy()))(
                       load_exported("onnx", paths["m.onnx"], paths["m.query.onnx"]))}
        parity = compare_exported(model, load_exported("onnx", paths["m.onnx"], paths["m.query.onnx"]), [args.size])
        times = {k: [] for k in runners}
        with torch.no_grad():
            for run in runners.values():
                run()  # warm-up
            for _ in range(args.repeats):
                for name, run in runners.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
    eager = float(np.median(times["eager"]))
    print(f"{args.backbone}, random weights, one {args.size[0]} x {args.size[1]} image (resized to "
          f"{cfg.INPUT.MIN_SIZE}/{cfg.INPUT.MAX_SIZE}), {args.threads} threads, median of {args.repeats}:")
    print(f"{'runtime':<14} {'s/image':>8} {'vs eager':>9}")
    for name, values in times.items():
        median = float(np.median(values))
        print(f"{name:<14} {median:>8.2f} {eager / median:>8.2f}x")
    print(f"ONNX parity on this image: {parity[0]}")


if __name__ == "__main__":
    run_main(main)
