"""Search an index (tools/index_gallery.py) for a person: the top K detections over every
indexed picture and video frame, as a table, a JSON file and a picture sheet.

    python tools/search.py --index INDEX_DIR --query IMAGE --box X1 Y1 X2 Y2 [--topk K] [--out DIR]

The query box is embedded by the model that made the index (rebuilt from the index's config and
checkpoint, whose weights must be the ones the index records; --ckpt when the file has moved).
Similarity is the search protocols' (the query embedding times each detection's score-weighted
embedding), ties broken by index order. Exact search: numpy below --faiss-min-rows rows, FAISS's
exact inner-product index from there on, with the same ranking. --cbgm re-ranks the top hits
with the query image's other people, by the protocols' rule.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils.runtime_env  # noqa: F401,E402  (before torch: passive OpenMP waits, freed memory kept)

from configs import load_config  # noqa: E402
from engine.build import build_eval_model  # noqa: E402
from engine.hit_sheet import draw_hit_sheet  # noqa: E402
from engine.index_search import FAISS_MIN_ROWS, build_searcher, search  # noqa: E402
from engine.indexing import embed_query, read_picture  # noqa: E402
from engine.inference import model_fingerprint  # noqa: E402
from engine.person_index import ModelMismatchError, PersonIndex  # noqa: E402
from utils.boxes import box_outside_image  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402
from utils.misc import atomic_write_json, resolve_device  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="index folder written by tools/index_gallery.py")
    p.add_argument("--query", required=True, help="picture showing the person to find")
    p.add_argument("--box", required=True, type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"),
                   help="the person's box in the query picture, in pixels")
    p.add_argument("--topk", type=int, default=10, help="number of hits (%(default)s)")
    p.add_argument("--out", default="output/search", help="folder for the JSON file and the picture (%(default)s)")
    p.add_argument("--name", help="file name stem of the results (default: the query picture's name)")
    p.add_argument("--searcher", choices=("auto", "numpy", "faiss"), default="auto",
                   help="auto: numpy below --faiss-min-rows rows, FAISS from there on (%(default)s)")
    p.add_argument("--faiss-min-rows", type=int, default=FAISS_MIN_ROWS,
                   help="auto: the index size (rows) from which FAISS is used (%(default)s)")
    p.add_argument("--cbgm", action="store_true", help="re-rank the top hits with the query picture's other people")
    p.add_argument("--cbgm-k1", type=int, default=10, help="CBGM: hits re-ranked (%(default)s, CUHK-SYSU's)")
    p.add_argument("--cbgm-k2", type=int, default=3, help="CBGM: people of the query picture used (%(default)s)")
    p.add_argument("--ckpt", help="the index's checkpoint at another path (its weights are checked)")
    p.add_argument("--force", action="store_true", help="replace results of an earlier search of the same name")
    args = p.parse_args(argv)
    if args.topk < 1 or args.cbgm_k1 < 1 or args.cbgm_k2 < 1:
        p.error("--topk, --cbgm-k1 and --cbgm-k2 must be at least 1")
    return args


def load_index_model(index, ckpt, device):
    """The model that made ``index``, from its config and checkpoint, checked by its weights."""
    stamp = index.stamp
    ckpt = ckpt or stamp.checkpoint
    if not os.path.isfile(ckpt):
        raise UserError(f"the index's checkpoint {ckpt} does not exist; pass its new path with --ckpt")
    cfg = load_config(index.config_path, [])
    model, _ = build_eval_model(cfg, ckpt, device, log=lambda *a: None)
    fingerprint = model_fingerprint(model)
    if fingerprint != stamp.fingerprint:
        raise ModelMismatchError(f"{ckpt} holds other weights ({fingerprint[:12]}) than the model that made "
                                 f"{index.folder} ({stamp.fingerprint[:12]}, from {stamp.checkpoint})")
    return model, cfg


def format_table(hits):
    lines = [f"{'rank':>4} {'similarity':>10} {'det score':>9}  {'box':<27} source"]
    for h in hits:
        box = " ".join(f"{v:.0f}" for v in h.box)
        where = h.source + (f"  frame {h.frame}" + (f" ({h.time:.2f} s)" if h.time is not None else "")
                            if h.kind == "video" else "")
        lines.append(f"{h.rank:>4} {h.similarity:>10.4f} {h.detection_score:>9.3f}  {box:<27} {where}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    index = PersonIndex.open(args.index)
    if not os.path.isfile(args.query):
        raise UserError(f"query picture not found: {args.query}")
    query_rgb = read_picture(args.query)
    problem = box_outside_image(args.box, query_rgb.shape[1], query_rgb.shape[0], "--box", args.query)
    if problem:
        raise UserError(problem)
    name = args.name or os.path.splitext(os.path.basename(args.query))[0]
    json_path, sheet_path = (os.path.join(args.out, f"{name}.{ext}") for ext in ("json", "jpg"))
    existing = [p for p in (json_path, sheet_path) if os.path.exists(p)]
    if existing and not args.force:
        raise UserError(f"{', '.join(existing)} exists; pass --force to replace it, or --name or --out for another")

    start = time.perf_counter()
    arrays = index.load()
    load_seconds = time.perf_counter() - start
    device = resolve_device(load_config(index.config_path, []).DEVICE, log=lambda *a: None)
    model, _ = load_index_model(index, args.ckpt, device)
    query, query_image_feats = embed_query(model, query_rgb, args.box, device)
    searcher = build_searcher(arrays.embeddings, args.searcher, args.faiss_min_rows) if len(arrays) else None
    start = time.perf_counter()
    cbgm = (args.cbgm_k1, args.cbgm_k2) if args.cbgm else None
    hits = search(arrays, index.sources, query, args.topk, searcher, query_image_feats, cbgm)
    search_ms = 1000 * (time.perf_counter() - start)

    how = f"{searcher.name if searcher else 'no'} search" + (f", CBGM k1={args.cbgm_k1} k2={args.cbgm_k2}" if cbgm else "")
    print(f"query {args.query} box {' '.join(f'{v:g}' for v in args.box)}: top {len(hits)} of {len(arrays)} "
          f"detections in {index.folder} ({how}; search {search_ms:.1f} ms, index loaded in {load_seconds:.2f} s)")
    print(format_table(hits) if hits else "the index holds no detections")
    result = {"query": os.path.abspath(args.query), "box": list(args.box), "index": os.path.abspath(args.index),
              "checkpoint": args.ckpt or index.stamp.checkpoint, "rows": len(arrays), "searcher": how,
              "topk": args.topk, "search_ms": search_ms, "index_load_seconds": load_seconds,
              "hits": [h.as_dict() for h in hits]}
    atomic_write_json(json_path, result)
    draw_hit_sheet(query_rgb, args.box, hits, sheet_path)
    print(f"wrote {json_path} and {sheet_path}")
    result["sheet"] = sheet_path
    return result


if __name__ == "__main__":
    run_main(main)
