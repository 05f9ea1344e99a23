"""What indexing and searching cost: indexing speed per model, query latency against index
size (numpy and FAISS), and memory and disk per million embeddings, in one run.

    python tools/bench_index.py [--models resnet50 resnet18 resnet18x05 mobilenetV2] [--images 3]
                                [--size 600 800] [--sizes 1e3 1e4 1e5 1e6] [--threads 2] [--out FILE.json]

Indexing: each model (CUHK-SYSU config of the backbone, random weights, resized to its
MIN_SIZE/MAX_SIZE as evaluation does) indexes --images random pictures of --size through the
real indexer (decode, forward, commit to disk), after one warm-up picture. Search: random unit
vectors (256-d) stand in for detections beyond the real ones; latency is the whole ``search``
call for one query (candidates, exact re-ranking, hits), median of 20 queries, for each
searcher. Memory: the bytes of the loaded arrays per row and the index's files on disk, measured
on a real index of the largest size up to 1e5 rows and given per million rows.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils.runtime_env  # noqa: F401,E402  (before torch: passive OpenMP waits, freed memory kept)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from configs import load_config  # noqa: E402
from engine.index_search import FaissSearcher, ExactSearcher, search  # noqa: E402
from engine.indexing import Indexer, find_sources, index_settings  # noqa: E402
from engine.inference import model_fingerprint  # noqa: E402
from engine.person_index import PART_ARRAYS, IndexArrays, ModelStamp, PersonIndex  # noqa: E402
from models import build_model  # noqa: E402
from models.seqnet import EMBEDDING_DIM  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.misc import atomic_write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONES = ("resnet50", "resnet18", "resnet18x05", "mobilenetV2")


def indexing_speed(backbone, pictures, folder):
    """Pictures per second of the indexer with this backbone's model (after a warm-up picture)."""
    cfg = load_config(os.path.join(ROOT, "configs", "cuhk_sysu", backbone, "base.yaml"),
                      ["BASELINE.BACKBONE_PRETRAIN", "False"])
    torch.manual_seed(0)
    model = build_model(cfg, role="baseline").eval()
    stamp = ModelStamp(model_fingerprint(model), "random weights", index_settings(cfg, 0.5))
    index = PersonIndex.open_or_create(os.path.join(folder, backbone), stamp, cfg.dump(), EMBEDDING_DIM)
    device = torch.device("cpu")
    Indexer(model, index, device, 0.5, progress=False).run(find_sources(pictures[:1]))  # warm-up
    summary = Indexer(model, index, device, 0.5, progress=False).run(find_sources(pictures[1:]))
    return {"model": backbone, "input": f"{cfg.INPUT.MIN_SIZE}/{cfg.INPUT.MAX_SIZE}", "images": summary.images,
            "seconds": summary.seconds, "images_per_second": summary.images / summary.seconds}


def random_arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, EMBEDDING_DIM), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scores = rng.uniform(0.5, 1.0, n).astype(np.float32)
    emb *= scores[:, None]  # as stored: the embedding times the detection score
    return IndexArrays(boxes=rng.uniform(0, 500, (n, 4)).astype(np.float32), scores=scores, embeddings=emb,
                       source=np.zeros(n, np.int32), image=np.arange(n, dtype=np.int64) // 4,
                       frame=np.full(n, -1, np.int64), time=np.full(n, np.nan))


def query_latency(n, queries=20, k=10):
    arrays = random_arrays(n)
    rng = np.random.default_rng(1)
    qs = rng.standard_normal((queries, EMBEDDING_DIM), dtype=np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    sources = [{"path": "synthetic", "kind": "image"}]
    row = {"rows": n}
    rankings = {}
    for searcher_type in (ExactSearcher, FaissSearcher):
        start = time.perf_counter()
        searcher = searcher_type(arrays.embeddings)
        build = time.perf_counter() - start
        search(arrays, sources, qs[0], k, searcher)  # warm-up
        times, ranks = [], []
        for q in qs:
            start = time.perf_counter()
            hits = search(arrays, sources, q, k, searcher)
            times.append(time.perf_counter() - start)
            ranks.append([h.row for h in hits])
        row[f"{searcher.name}_ms"] = 1000 * float(np.median(times))
        row[f"{searcher.name}_build_s"] = build
        rankings[searcher.name] = ranks
    row["same_ranking"] = rankings["numpy"] == rankings["faiss"]
    return row


def memory_per_million(n):
    """Loaded bytes per row and disk bytes per row of a real index of n random rows."""
    arrays = random_arrays(n)
    with tempfile.TemporaryDirectory() as folder:
        index = PersonIndex.open_or_create(folder, ModelStamp("0" * 64, "none", {}), "", EMBEDDING_DIM)
        index.commit({name: getattr(arrays, name) for name in PART_ARRAYS}, [{"path": "synthetic", "kind": "image",
                                                                              "done": True}], n)
        disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        start = time.perf_counter()
        loaded = PersonIndex.open(folder).load()
        load_seconds = time.perf_counter() - start
    memory = sum(getattr(loaded, name).nbytes for name in PART_ARRAYS)
    scale = 1e6 / n
    return {"measured_rows": n, "memory_gb_per_million": memory * scale / 1e9, "disk_gb_per_million": disk * scale / 1e9,
            "load_seconds_per_million": load_seconds * scale,
            "faiss_copy_gb_per_million": 4 * EMBEDDING_DIM * 1e6 / 1e9}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(BACKBONES), choices=BACKBONES)
    p.add_argument("--images", type=int, default=3, help="pictures indexed per model, after one warm-up")
    p.add_argument("--size", type=int, nargs=2, default=[600, 800], metavar=("H", "W"), help="picture size")
    p.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6], help="index sizes (rows)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "picture_size": args.size, "indexing": [], "search": []}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        pictures = []
        for i in range(args.images + 1):
            path = os.path.join(tmp, f"picture_{i}.jpg")
            Image.fromarray(rng.integers(0, 255, (*args.size, 3), dtype=np.uint8)).save(path, quality=90)
            pictures.append(path)
        for backbone in args.models:
            report["indexing"].append(indexing_speed(backbone, pictures, tmp))
            r = report["indexing"][-1]
            print(f"indexing {backbone:<12} {r['images_per_second']:.3f} pictures/s ({args.size[0]}x{args.size[1]} "
                  f"resized to {r['input']}, {r['images']} pictures, {args.threads} threads)", flush=True)
    for n in args.sizes:
        r = query_latency(int(n))
        report["search"].append(r)
        print(f"search {int(n):>9,} rows: numpy {r['numpy_ms']:8.2f} ms, faiss {r['faiss_ms']:8.2f} ms "
              f"(index built in {r['faiss_build_s']:.2f} s), same ranking: {r['same_ranking']}", flush=True)
    report["memory"] = memory_per_million(int(min(max(args.sizes), 1e5)))
    m = report["memory"]
    print(f"per million detections: {m['memory_gb_per_million']:.2f} GB in memory "
          f"(+{m['faiss_copy_gb_per_million']:.2f} GB for FAISS's copy), {m['disk_gb_per_million']:.2f} GB on disk, "
          f"loaded in {m['load_seconds_per_million']:.2f} s (measured on {m['measured_rows']:,} rows)")
    if args.out:
        atomic_write_json(args.out, report)
    return report


if __name__ == "__main__":
    run_main(main)
