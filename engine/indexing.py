"""Fill a person-search index (``engine.person_index``): run a model once over pictures and
videos and store every detection.

Pictures are read with Pillow, videos with OpenCV, one frame in ``every`` (frames 0, every,
2 * every, ...; the time of frame f is f / fps). Each picture or sampled frame is one forward of
the model at batch 1, exactly as the evaluation runs a gallery image, and its detections from
``min_score`` on are kept (the search protocols' 0.5 by default).

Resumable and incremental: the rows are committed every ``commit_every`` images (and when a
source ends, and on an interrupt or error) together with what is done: finished pictures and
videos are skipped by the next run, a video that was interrupted goes on from its next
frame, new files are added, and a file that changed since it was indexed (size or modification
time) is indexed again, its old rows left out of searches.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from engine.person_index import PART_ARRAYS, PersonIndex
from utils.errors import UserError

__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "IndexingSummary", "Indexer", "Source", "SourceError",
           "find_sources", "read_frames", "read_picture", "video_frames"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v", ".wmv")


class SourceError(UserError):
    """A picture or video that cannot be indexed or read."""


@dataclass(frozen=True)
class Source:
    path: str   # absolute
    kind: str   # "image" or "video"

    def stat(self) -> Tuple[int, int]:
        st = os.stat(self.path)
        return int(st.st_size), int(st.st_mtime_ns)


def _kind(path: str):
    suffix = os.path.splitext(path)[1].lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def find_sources(paths: Sequence[str]) -> List[Source]:
    """The pictures and videos named by ``paths`` (files, or folders searched recursively, files
    of other types there ignored), each once, in a stable order: the given order, sorted names
    within a folder."""
    found, seen = [], set()
    for given in paths:
        if os.path.isdir(given):
            names = []
            for root, dirs, files in os.walk(given):
                dirs.sort()
                names += [os.path.join(root, f) for f in sorted(files) if _kind(f)]
            if not names:
                raise SourceError(f"{given} holds no pictures ({', '.join(IMAGE_SUFFIXES)}) or videos "
                                  f"({', '.join(VIDEO_SUFFIXES)})")
        elif os.path.isfile(given):
            if _kind(given) is None:
                raise SourceError(f"{given}: not a picture ({', '.join(IMAGE_SUFFIXES)}) or video "
                                  f"({', '.join(VIDEO_SUFFIXES)}), by its name")
            names = [given]
        else:
            raise SourceError(f"{given} does not exist")
        for name in names:
            path = os.path.abspath(name)
            if path not in seen:
                seen.add(path)
                found.append(Source(path, _kind(path)))
    return found


def read_picture(path: str) -> np.ndarray:
    """H x W x 3 uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot read picture {path}: {err}") from None


def _open_video(path: str):
    import cv2

    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise SourceError(f"cannot open video {path} (OpenCV {cv2.__version__} found no decoder for it)")
    return capture


def video_frames(path: str, every: int, start: int = 0) -> Iterator[Tuple[int, float, np.ndarray]]:
    """(frame number, time in seconds, H x W x 3 uint8 RGB) of frames start, ... that are a multiple
    of ``every``, decoded in order (frames before ``start`` and between samples are skipped
    without being converted). Time is NaN when the file states no frame rate."""
    import cv2

    capture = _open_video(path)
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
        fps = fps if fps and math.isfinite(fps) and fps > 0 else float("nan")
        number = 0
        while True:
            if number < start or number % every:
                if not capture.grab():
                    return
            else:
                ok, frame = capture.read()
                if not ok:
                    return
                yield number, number / fps, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            number += 1
    finally:
        capture.release()


def video_frame_count(path: str) -> int:
    """The frame count the video's header states (may be approximate; 0 when unknown)."""
    import cv2

    capture = _open_video(path)
    try:
        return max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
    finally:
        capture.release()


def read_frames(path: str, kind: str, frames: Sequence[int]) -> Dict[int, np.ndarray]:
    """{frame: H x W x 3 uint8 RGB} of the picture (frame -1) or of the video's frames, decoded in
    one pass from the start (exact for any codec, unlike seeking)."""
    if kind == "image":
        return {f: read_picture(path) for f in set(frames)}
    wanted = set(int(f) for f in frames)
    found = {}
    if wanted:
        for number, _, rgb in video_frames(path, every=1, start=min(wanted)):
            if number in wanted:
                found[number] = rgb
                if len(found) == len(wanted):
                    break
    missing = sorted(wanted - set(found))
    if missing:
        raise SourceError(f"video {path} has no frame {missing[0]}")
    return found


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)


@dataclass
class IndexingSummary:
    added: List[str] = field(default_factory=list)      # new sources
    reindexed: List[str] = field(default_factory=list)  # changed since indexed
    resumed: List[str] = field(default_factory=list)    # videos continued
    skipped: List[str] = field(default_factory=list)    # already complete
    images: int = 0                                      # pictures and frames run now
    rows: int = 0                                        # detections added now
    seconds: float = 0.0

    def as_dict(self) -> Dict:
        return {"added": len(self.added), "reindexed": len(self.reindexed), "resumed": len(self.resumed),
                "skipped": len(self.skipped), "images": self.images, "rows": self.rows,
                "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images / self.seconds, 3) if self.seconds else None}


class Indexer:
    """Runs ``model`` over sources and commits the rows into ``index``."""

    def __init__(self, model, index: PersonIndex, device, min_score: float, commit_every: int = 64,
                 progress: bool = True):
        if commit_every < 1:
            raise ValueError(f"commit_every must be at least 1, got {commit_every}")
        self.model, self.index, self.device = model, index, device
        self.min_score, self.commit_every, self.progress = float(min_score), int(commit_every), progress
        self._sources = [dict(s) for s in index.sources]
        self._next_image = index.next_image_id()
        self._pending: Dict[str, List[np.ndarray]] = {name: [] for name in PART_ARRAYS}
        self._pending_images = 0

    # -- planning ------------------------------------------------------------------------
    def _plan(self, sources: Sequence[Source], every: int, summary: IndexingSummary):
        """[(source, position of its entry (None: new), first frame)] still to run; bookkeeping of
        the rest into summary."""
        todo = []
        for src in sources:
            size, mtime = src.stat()
            position = self.index.latest_source(src.path)
            entry = self._sources[position] if position is not None else None
            if entry is not None and (entry["size"], entry["mtime_ns"]) != (size, mtime):
                self._sources[position]["superseded"] = True
                summary.reindexed.append(src.path)
                entry = None
            elif entry is None:
                summary.added.append(src.path)
            if entry is not None and entry["done"]:
                summary.skipped.append(src.path)
                continue
            if entry is not None:  # an interrupted video: go on with its frame step
                summary.resumed.append(src.path)
                todo.append((src, position, int(entry["next_frame"])))
                continue
            todo.append((src, None, 0))  # its entry is made when it is run
        return todo

    # -- running -------------------------------------------------------------------------
    @torch.no_grad()
    def _detect(self, rgb: np.ndarray):
        out = self.model([to_tensor(rgb).to(self.device)])[0]
        keep = out["scores"] >= self.min_score
        boxes = out["boxes"][keep].float().cpu().numpy().reshape(-1, 4)
        scores = out["scores"][keep].float().cpu().numpy().reshape(-1)
        emb = out["embeddings"][keep].float().cpu().numpy().reshape(len(scores), out["embeddings"].shape[-1])
        return boxes, scores, emb

    def _new_entry(self, src: Source, every: int) -> int:
        size, mtime = src.stat()
        entry = {"path": src.path, "kind": src.kind, "size": size, "mtime_ns": mtime, "done": False, "rows": 0,
                 "images": 0}
        if src.kind == "video":
            entry.update(every=int(every), next_frame=0, fps=None)
        self._sources.append(entry)
        return len(self._sources) - 1

    def _store(self, position: int, frame: int, seconds: float, detections) -> int:
        boxes, scores, emb = detections
        n = len(scores)
        if emb.shape[1] != self.index.embedding_dim:
            raise RuntimeError(f"the model gives {emb.shape[1]}-d embeddings; the index holds "
                               f"{self.index.embedding_dim}-d ones")
        columns = {"boxes": boxes, "scores": scores, "embeddings": emb, "source": np.full(n, position),
                   "image": np.full(n, self._next_image), "frame": np.full(n, frame), "time": np.full(n, seconds)}
        for name, (dtype, _) in PART_ARRAYS.items():
            self._pending[name].append(np.asarray(columns[name], dtype=dtype))
        self._next_image += 1
        self._pending_images += 1
        entry = self._sources[position]
        entry["rows"] += n
        entry["images"] += 1
        return n

    def _commit(self) -> None:
        rows = {name: np.concatenate(parts) if parts else None for name, parts in self._pending.items()}
        self.index.commit(rows if self._pending["scores"] else {}, [dict(s) for s in self._sources], self._next_image)
        self._pending = {name: [] for name in PART_ARRAYS}
        self._pending_images = 0

    def _maybe_commit(self) -> None:
        if self._pending_images >= self.commit_every:
            self._commit()

    def _run_video(self, src: Source, position, start: int, every: int, bar, summary: IndexingSummary) -> None:
        import cv2

        if position is None:
            position = self._new_entry(src, every)
        entry = self._sources[position]
        capture = _open_video(src.path)
        entry["fps"] = float(capture.get(cv2.CAP_PROP_FPS)) or None
        capture.release()
        for number, seconds, rgb in video_frames(src.path, int(entry["every"]), start):
            summary.rows += self._store(position, number, seconds, self._detect(rgb))
            entry["next_frame"] = number + 1
            summary.images += 1
            bar.update(1)
            self._maybe_commit()
        entry["done"] = True

    def run(self, sources: Sequence[Source], every: int = 10) -> IndexingSummary:
        """Index what of ``sources`` is not in the index yet; return what was done."""
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        summary = IndexingSummary()
        start_time = time.perf_counter()
        todo = self._plan(sources, every, summary)
        def step(position):
            return every if position is None else int(self._sources[position]["every"])

        total = sum(1 if s.kind == "image" else -(-max(video_frame_count(s.path) - first, 0) // step(p))
                    for s, p, first in todo)
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=total, desc="indexing", unit="img", disable=not self.progress, dynamic_ncols=True)
        try:
            for src, position, first in todo:
                bar.set_postfix_str(os.path.basename(src.path), refresh=False)
                if src.kind == "image":
                    detections = self._detect(read_picture(src.path))
                    position = self._new_entry(src, every)  # a picture's entry is made once it is run
                    summary.rows += self._store(position, -1, float("nan"), detections)
                    self._sources[position]["done"] = True
                    summary.images += 1
                    bar.update(1)
                    self._maybe_commit()
                else:
                    self._run_video(src, position, first, every, bar, summary)
                    self._commit()  # a finished video is recorded at once
            self._commit()
        except BaseException:
            # keep what is complete (every pending image was run to the end); the original error
            # is the one to report, even if this last commit fails too
            try:
                self._commit()
            except Exception:
                pass
            raise
        finally:
            bar.close()
            self.model.train(was_training)
            summary.seconds = time.perf_counter() - start_time
        return summary


def index_settings(cfg, min_score: float) -> Dict:
    """The settings besides the weights that change an index's rows."""
    return {"min_score": float(min_score), "min_size": int(cfg.INPUT.MIN_SIZE), "max_size": int(cfg.INPUT.MAX_SIZE)}


@torch.no_grad()
def embed_query(model, rgb: np.ndarray, box: Sequence[float], device) -> Tuple[np.ndarray, np.ndarray]:
    """(the query box's embedding (D,), the query image's people: the query box first, then the
    image's detections, for CBGM), from one forward as the evaluation embeds a query."""
    was_training = model.training
    model.eval()
    try:
        target = {"boxes": torch.as_tensor(np.asarray(box, np.float32).reshape(1, 4), device=device)}
        out = model([to_tensor(rgb).to(device)], [target], query_img_as_gallery=True)[0]
    finally:
        model.train(was_training)
    feats = out["embeddings"].float().cpu().numpy()
    return feats[0].copy(), feats
