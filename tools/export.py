"""Export the evaluated model (teacher, student, or an original release's checkpoint) as one
TorchScript file or two ONNX files, and check the export against the model on the spot.

    python tools/export.py --cfg CONFIG --ckpt CHECKPOINT --format torchscript --out student.pt
    python tools/export.py --cfg CONFIG --ckpt CHECKPOINT --format onnx --out student.onnx
        # also writes student.query.onnx (the query-box embedding)

The exported pipeline takes one RGB image as a float32 3 x H x W tensor in [0, 1], any size, and
returns the detections' boxes, scores and L2-normalised embeddings; the query path takes the
image and a 1 x 4 box and returns its embedding. See models/export.py and docs/export.md for
what is and is not exported, and for using the files from Python without this code.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from configs import load_config  # noqa: E402
from engine.build import build_eval_model  # noqa: E402
from engine.export_check import compare_exported, load_exported  # noqa: E402
from models.export import export_onnx, export_torchscript  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402


def query_path_for(out: str) -> str:
    stem, ext = os.path.splitext(out)
    return f"{stem}.query{ext or '.onnx'}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="config the checkpoint was trained with (its config.yaml)")
    p.add_argument("--ckpt", required=True, help="checkpoint: single model or distilled student")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    p.add_argument("--out", required=True, help="file to write (ONNX: the query model goes beside it, *.query.onnx)")
    p.add_argument("--check-sizes", type=int, nargs="+", default=[480, 640, 720, 540, 600, 1000],
                   metavar="H W", help="image sizes (pairs) on which the export is compared with the model")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if len(args.check_sizes) % 2:
        p.error("--check-sizes takes pairs of numbers (H W ...)")
    outputs = [args.out] + ([query_path_for(args.out)] if args.format == "onnx" else [])
    existing = [f for f in outputs if os.path.exists(f)]
    if existing and not args.force:
        raise UserError(f"{', '.join(existing)} exists; choose another --out or pass --force")
    cfg = load_config(args.cfg, args.opts)
    model, _ = build_eval_model(cfg, args.ckpt, torch.device("cpu"))
    example = torch.rand(3, cfg.INPUT.MIN_SIZE, cfg.INPUT.MAX_SIZE, generator=torch.Generator().manual_seed(0))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.format == "torchscript":
        export_torchscript(model, args.out, example)
    else:
        export_onnx(model, args.out, outputs[1], example)
    sizes = list(zip(args.check_sizes[::2], args.check_sizes[1::2]))
    report = compare_exported(model, load_exported(args.format, *outputs), sizes)
    print(f"wrote {', '.join(outputs)} (torch {torch.__version__}); compared with the model on images of "
          f"{', '.join(f'{h}x{w}' for h, w in sizes)}:")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_main(main)
