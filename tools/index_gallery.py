"""Index pictures and videos once: every person a model detects, with its source, box, score
and embedding, stored in an index folder that tools/search.py queries.

    python tools/index_gallery.py --cfg CONFIG --ckpt CHECKPOINT --index INDEX_DIR --input PATH [PATH ...]
        # PATH: picture or video files, or folders (searched recursively); or --list FILE, one per line

Videos are decoded with OpenCV, one frame in --every; each hit then knows its frame and time.
Run it again with the same --index to add new files (finished ones are skipped, a file changed
since it was indexed is indexed again) or to go on after an interrupt (Ctrl-C keeps what is done).
An index holds one model's rows: another checkpoint or other settings are refused.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils.runtime_env  # noqa: F401,E402  (before torch: passive OpenMP waits, freed memory kept)

from configs import load_config  # noqa: E402
from engine.build import build_eval_model  # noqa: E402
from engine.indexing import Indexer, find_sources, index_settings  # noqa: E402
from engine.inference import model_fingerprint  # noqa: E402
from engine.person_index import MANIFEST, ModelStamp, PersonIndex  # noqa: E402
from models.seqnet import EMBEDDING_DIM  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402
from utils.misc import resolve_device  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="config file (YAML) the checkpoint was trained with")
    p.add_argument("--ckpt", required=True, help="checkpoint: single model or distilled student")
    p.add_argument("--index", required=True, help="index folder: created when new, extended when it exists")
    p.add_argument("--input", nargs="+", default=[], metavar="PATH", help="pictures, videos or folders of them")
    p.add_argument("--list", metavar="FILE", help="a text file naming one picture, video or folder per line")
    p.add_argument("--every", type=int, default=10, help="videos: index one frame in this many (%(default)s)")
    p.add_argument("--min-score", type=float, default=0.5,
                   help="keep detections from this score on (%(default)s, the search protocols' threshold)")
    p.add_argument("--commit-every", type=int, default=64,
                   help="save the rows to disk after this many pictures or frames (%(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if not args.input and not args.list:
        p.error("give the pictures and videos to index with --input or --list")
    if args.every < 1 or args.commit_every < 1:
        p.error("--every and --commit-every must be at least 1")
    if not 0.0 <= args.min_score <= 1.0:
        p.error(f"--min-score must lie in [0, 1], got {args.min_score}")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.cfg, args.opts)
    paths = list(args.input)
    if args.list:
        if not os.path.isfile(args.list):
            raise UserError(f"--list {args.list} does not exist")
        with open(args.list) as f:
            paths += [line.strip() for line in f if line.strip()]
    sources = find_sources(paths)  # missing or unknown files stop here, before the model is loaded
    if os.path.isfile(os.path.join(args.index, MANIFEST)):
        PersonIndex.open(args.index)  # a damaged index stops here too
    elif os.path.isdir(args.index) and os.listdir(args.index):
        raise UserError(f"{args.index} holds files but no {MANIFEST}: choose a new or empty folder for an index")
    device = resolve_device(cfg.DEVICE)
    ckpt = os.path.abspath(args.ckpt)
    model, _ = build_eval_model(cfg, ckpt, device)
    stamp = ModelStamp(model_fingerprint(model), ckpt, index_settings(cfg, args.min_score))
    index = PersonIndex.open_or_create(args.index, stamp, cfg.dump(), EMBEDDING_DIM)
    print(f"indexing {len(sources)} file(s) into {args.index} ({index.num_rows} detections there now; "
          f"detections from score {args.min_score}, videos every {args.every} frames)")
    summary = Indexer(model, index, device, args.min_score, args.commit_every, not args.no_progress).run(
        sources, every=args.every)
    info = summary.as_dict()
    print(f"added {info['added']} new, re-indexed {info['reindexed']} changed, resumed {info['resumed']}, "
          f"skipped {info['skipped']} done; {info['images']} pictures/frames, {info['rows']} detections in "
          f"{info['seconds']:.1f} s ({info['images_per_second'] or 0:.2f} img/s); the index holds "
          f"{index.num_rows} detections of {len(index.sources)} sources")
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    run_main(main)
