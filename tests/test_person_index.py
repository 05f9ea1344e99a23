"""The person-search index: what indexing stores (checked against independent forwards and an
independent video decode), resume after an interrupt, incremental runs, refusing another model,
exact search by numpy and FAISS against a brute-force ranking, CBGM re-ranking against a slow
reference of the rule, the command-line tools and their errors."""

import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from configs import load_config
from engine.index_search import CANDIDATE_MARGIN, ExactSearcher, FaissSearcher, build_searcher, search
from engine.indexing import Indexer, SourceError, embed_query, find_sources, index_settings, read_frames
from engine.inference import model_fingerprint
from engine.person_index import (IndexArrays, IndexFormatError, ModelMismatchError, ModelStamp, PersonIndex,
                                 PersonIndexError)
from models import build_model
from models.seqnet import EMBEDDING_DIM
from tests.helpers import mini_world, one_torch_thread, small_opts, write_yaml  # noqa: F401
from tools import index_gallery
from tools import search as search_tool
from utils.errors import UserError

EVERY = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mini_world(tmp_path_factory.mktemp("index_world"))


@pytest.fixture(scope="module")
def setup(world, tmp_path_factory):
    """A random-weight model (5 detections an image), its config and checkpoint, 8 pictures and
    a 12-frame MJPG video made from 3 more (each held 4 frames)."""
    folder = tmp_path_factory.mktemp("index_setup")
    cfg = load_config(None, small_opts(world, "CUHK-SYSU", folder / "out", MODEL__ROI_HEAD__DETECTIONS_PER_IMAGE_TEST=5))
    torch.manual_seed(0)
    model = build_model(cfg, "baseline").eval()
    torch.save({"model": model.state_dict(), "epoch": 1}, folder / "model.pth")
    pictures = sorted((world / "CUHK-SYSU" / "Image" / "SSM").glob("*.jpg"))
    shutil.copytree(pictures[0].parent, folder / "pictures", ignore=lambda d, names: [
        n for n in names if n not in {p.name for p in pictures[:8]}])
    video = folder / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (160, 120))
    for p in pictures[8:11]:
        frame = cv2.cvtColor(np.asarray(Image.open(p).convert("RGB").resize((160, 120))), cv2.COLOR_RGB2BGR)
        for _ in range(4):
            writer.write(frame)
    writer.release()
    return {"cfg": cfg, "yaml": write_yaml(cfg, folder / "model.yaml"), "ckpt": str(folder / "model.pth"),
            "model": model, "pictures": folder / "pictures", "video": str(video), "folder": folder}


def _stamp(setup, min_score=0.0):
    return ModelStamp(model_fingerprint(setup["model"]), setup["ckpt"], index_settings(setup["cfg"], min_score))


def _new_index(setup, folder, min_score=0.0):
    return PersonIndex.open_or_create(str(folder), _stamp(setup, min_score), setup["cfg"].dump(), EMBEDDING_DIM)


def _index(setup, folder, inputs, commit_every=4, model=None):
    index = _new_index(setup, folder)
    Indexer(model or setup["model"], index, torch.device("cpu"), 0.0, commit_every, progress=False).run(
        find_sources(inputs), every=EVERY)
    return PersonIndex.open(str(folder))


def _decoded_frames(path):
    """Every frame of a video, decoded independently of the code under test."""
    capture, frames = cv2.VideoCapture(path), []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


@torch.no_grad()
def _reference_rows(model, rgb, min_score=0.0):
    out = model([torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255])[0]
    keep = out["scores"] >= min_score
    return out["boxes"][keep].numpy(), out["scores"][keep].numpy(), out["embeddings"][keep].numpy()


def test_index_holds_each_detection_of_each_picture_and_sampled_frame(setup, tmp_path):
    index = _index(setup, tmp_path / "idx", [str(setup["pictures"]), setup["video"]])
    arrays = index.load()
    pictures = sorted(setup["pictures"].glob("*.jpg"))
    frames = _decoded_frames(setup["video"])
    assert len(frames) == 12
    expected = [(str(p), -1, np.asarray(Image.open(p).convert("RGB"))) for p in pictures]
    expected += [(setup["video"], f, frames[f]) for f in range(0, 12, EVERY)]
    assert [s["path"] for s in index.sources] == [str(p) for p in pictures] + [setup["video"]]
    rows = 0
    for image_id, (path, frame, rgb) in enumerate(expected):
        span = arrays.image_rows(image_id)
        boxes, scores, emb = _reference_rows(setup["model"], rgb)
        assert span.stop - span.start == len(scores) > 0
        np.testing.assert_array_equal(arrays.boxes[span], boxes)
        np.testing.assert_array_equal(arrays.scores[span], scores)
        np.testing.assert_array_equal(arrays.embeddings[span], emb)
        assert {index.sources[s]["path"] for s in arrays.source[span]} == {path}
        assert set(arrays.frame[span]) == {frame}
        times = arrays.time[span]
        assert np.isnan(times).all() if frame < 0 else np.allclose(times, frame / 5.0)
        rows += len(scores)
    assert len(arrays) == rows == index.num_rows
    assert all(s["done"] for s in index.sources)
    assert index.sources[-1]["every"] == EVERY and index.sources[-1]["fps"] == pytest.approx(5.0)


def test_read_frames_returns_the_decoded_frames(setup):
    frames = _decoded_frames(setup["video"])
    got = read_frames(setup["video"], "video", [7, 2])
    assert sorted(got) == [2, 7]
    np.testing.assert_array_equal(got[7], frames[7])
    np.testing.assert_array_equal(got[2], frames[2])
    with pytest.raises(SourceError, match="has no frame 40"):
        read_frames(setup["video"], "video", [40])


class _Interrupting(torch.nn.Module):
    """The model, interrupted (Ctrl-C) at its ``after``-th forward."""

    def __init__(self, model, after):
        super().__init__()
        self.model, self.after, self.calls = model, after, 0
        self.eval()  # the indexer puts the model back in the mode it found it in

    def forward(self, images, targets=None):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.model(images, targets)


def _arrays_equal(a: IndexArrays, b: IndexArrays):
    for name in ("boxes", "scores", "embeddings", "source", "image", "frame"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(np.isnan(a.time), np.isnan(b.time))


@pytest.mark.parametrize("stop_at", [3, 10])  # in the pictures; in the video (after 8 pictures)
def test_an_interrupted_run_resumes_to_the_same_index(setup, tmp_path, stop_at):
    inputs = [str(setup["pictures"]), setup["video"]]
    straight = _index(setup, tmp_path / "straight", inputs).load()
    index = _new_index(setup, tmp_path / "resumed")
    interrupted = _Interrupting(setup["model"], stop_at)
    with pytest.raises(KeyboardInterrupt):
        Indexer(interrupted, index, torch.device("cpu"), 0.0, 4, progress=False).run(find_sources(inputs), EVERY)
    kept = PersonIndex.open(str(tmp_path / "resumed"))
    assert kept.next_image_id() == stop_at - 1  # every image before the interrupt is kept
    counting = _Interrupting(setup["model"], after=-1)
    summary = Indexer(counting, kept, torch.device("cpu"), 0.0, 4, progress=False).run(find_sources(inputs), EVERY)
    assert counting.calls == 12 - (stop_at - 1)  # 8 pictures + 4 sampled frames, each run once in all
    assert (len(summary.resumed) == 1) == (stop_at > 8)
    _arrays_equal(PersonIndex.open(str(tmp_path / "resumed")).load(), straight)


def test_incremental_runs_add_new_files_and_reindex_changed_ones(setup, tmp_path):
    pictures = tmp_path / "pictures"
    shutil.copytree(setup["pictures"], pictures)
    names = sorted(os.listdir(pictures))
    for name in names[5:]:
        (pictures / name).rename(tmp_path / name)
    _index(setup, tmp_path / "idx", [str(pictures)])
    for name in names[5:]:
        (tmp_path / name).rename(pictures / name)
    changed = pictures / names[0]
    Image.open(pictures / names[1]).save(changed)  # other content, other size and time
    counting = _Interrupting(setup["model"], after=-1)
    index = PersonIndex.open(str(tmp_path / "idx"))
    summary = Indexer(counting, index, torch.device("cpu"), 0.0, 4, progress=False).run(find_sources([str(pictures)]))
    assert counting.calls == 4 and len(summary.added) == 3 and summary.reindexed == [str(changed)]
    assert len(summary.skipped) == 4
    arrays = PersonIndex.open(str(tmp_path / "idx")).load()
    sources = PersonIndex.open(str(tmp_path / "idx")).sources
    assert [s.get("superseded", False) for s in sources].count(True) == 1
    current_paths = [sources[i]["path"] for i in np.unique(arrays.source)]
    assert sorted(current_paths) == sorted(str(pictures / n) for n in names)  # each file once
    rows = arrays.source == [i for i, s in enumerate(sources) if s["path"] == str(changed)][-1]
    _, scores, emb = _reference_rows(setup["model"], np.asarray(Image.open(changed).convert("RGB")))
    np.testing.assert_array_equal(arrays.embeddings[rows], emb)


def test_an_index_refuses_another_model_or_other_settings(setup, tmp_path):
    _new_index(setup, tmp_path / "idx")
    other = ModelStamp("0" * 64, "/elsewhere/other.pth", index_settings(setup["cfg"], 0.0))
    with pytest.raises(ModelMismatchError, match=r"model weights .* \(from /elsewhere/other.pth\)"):
        PersonIndex.open_or_create(str(tmp_path / "idx"), other, "", EMBEDDING_DIM)
    with pytest.raises(ModelMismatchError, match=r"min_score 0\.0 vs 0\.5"):
        _new_index(setup, tmp_path / "idx", min_score=0.5)
    moved = ModelStamp(_stamp(setup).fingerprint, "/moved/model.pth", _stamp(setup).settings)
    PersonIndex.open_or_create(str(tmp_path / "idx"), moved, "", EMBEDDING_DIM)  # same weights: accepted


def test_damaged_or_foreign_index_files_are_named(setup, tmp_path):
    with pytest.raises(PersonIndexError, match="does not exist"):
        PersonIndex.open(str(tmp_path / "none"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PersonIndexError, match="holds files but no index.json"):
        _new_index(setup, tmp_path / "busy")
    folder = tmp_path / "idx"
    _index(setup, folder, [str(setup["pictures"])])
    part = folder / "part-000000.npz"
    good = part.read_bytes()
    part.write_bytes(good[: len(good) // 2])
    with pytest.raises(IndexFormatError, match="part-000000.npz: cannot read"):
        PersonIndex.open(str(folder)).load()
    # a part holding a pickled object array is refused, never unpickled
    with np.load(__import__("io").BytesIO(good)) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["scores"] = np.array([object()] * len(arrays["scores"]), dtype=object)
    np.savez(part, **arrays)
    with pytest.raises(IndexFormatError, match="part-000000.npz: cannot read"):
        PersonIndex.open(str(folder)).load()
    (folder / "index.json").write_text("{")
    with pytest.raises(IndexFormatError, match="index.json: cannot read the index manifest"):
        PersonIndex.open(str(folder))


def _brute_force(embeddings, query, k):
    """The ranking by definition: every row's float64 similarity, sorted descending, then by row."""
    sims = [float(np.dot(e.astype(np.float64), query.astype(np.float64))) for e in embeddings]
    order = sorted(range(len(sims)), key=lambda r: (-sims[r], r))[:k]
    return order, [sims[r] for r in order]


def _random_arrays(n, seed, duplicates=True):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    if duplicates:  # exact ties: the same embedding in several rows
        emb[n // 2: n // 2 + 5] = emb[7]
    image = np.sort(rng.integers(0, n // 3, n))
    return IndexArrays(boxes=np.tile(np.float32([0, 0, 10, 20]), (n, 1)), scores=np.ones(n, np.float32),
                       embeddings=emb, source=np.zeros(n, np.int32), image=image.astype(np.int64),
                       frame=np.full(n, -1, np.int64), time=np.full(n, np.nan))


@pytest.mark.parametrize("k", [1, 6, 25])
def test_numpy_and_faiss_give_the_brute_force_ranking(k):
    arrays = _random_arrays(3000, seed=k)
    sources = [{"path": "a.jpg", "kind": "image"}]
    for query in (arrays.embeddings[7], arrays.embeddings[100] + 0.01):
        expected = _brute_force(arrays.embeddings, query, k)
        for searcher in (ExactSearcher(arrays.embeddings), FaissSearcher(arrays.embeddings)):
            hits = search(arrays, sources, query, k, searcher)
            assert [h.row for h in hits] == expected[0], searcher.name
            assert [h.similarity for h in hits] == expected[1], searcher.name
    # the tie of rows 7, 1500..1504 comes out in row order
    hits = search(arrays, sources, arrays.embeddings[7], 6, FaissSearcher(arrays.embeddings))
    assert [h.row for h in hits] == [7, 1500, 1501, 1502, 1503, 1504]


def test_faiss_asks_for_more_until_every_tie_at_the_kth_place_is_in():
    arrays = _random_arrays(500, seed=1, duplicates=False)
    arrays.embeddings[100:200] = arrays.embeddings[3]  # 101 equal rows, more than 2k + 16
    query = arrays.embeddings[3]
    faiss_rows = FaissSearcher(arrays.embeddings).candidates(query, 5)
    assert set(faiss_rows) >= {3, *range(100, 200)}
    assert [h.row for h in search(arrays, [{"path": "a", "kind": "image"}], query, 5,
                                  FaissSearcher(arrays.embeddings))] == [3, 100, 101, 102, 103]


def test_auto_searcher_is_chosen_by_size():
    emb = np.eye(4, dtype=np.float32)
    assert build_searcher(emb, "auto", faiss_min_rows=5).name == "numpy"
    assert build_searcher(emb, "auto", faiss_min_rows=4).name == "faiss"
    assert CANDIDATE_MARGIN < 1e-3


def _cbgm_reference(arrays, query, people, k, k1, k2):
    """The rule, literally: rank all rows; for each image of the first k1, assign the query
    picture's first k2 people to the image's rows; the query person's row gets the largest
    matched weight; rank all rows again."""
    from scipy.optimize import linear_sum_assignment

    sims = arrays.embeddings.astype(np.float64) @ query.astype(np.float64)
    order = sorted(range(len(sims)), key=lambda r: (-sims[r], r))
    new = sims.copy()
    for image in sorted({int(arrays.image[r]) for r in order[:k1]}):
        rows = [r for r in range(len(sims)) if arrays.image[r] == image]
        w = np.array([[float(np.dot(p.astype(np.float64), arrays.embeddings[r].astype(np.float64))) for r in rows]
                      for p in people[:k2]])
        pi, di = linear_sum_assignment(w, maximize=True)
        if len(pi) and pi[0] == 0:
            new[rows[di[0]]] = max(w[a, b] for a, b in zip(pi, di))
    ranked = sorted(range(len(new)), key=lambda r: (-new[r], r))[:k]
    return ranked, [new[r] for r in ranked]


@pytest.mark.parametrize("k", [3, 12])
def test_cbgm_reranking_follows_the_protocols_rule(k):
    # no equal rows: two equal detections in one picture make the assignment itself ambiguous
    arrays = _random_arrays(400, seed=5, duplicates=False)
    rng = np.random.default_rng(9)
    people = rng.standard_normal((4, 32)).astype(np.float32)
    query = people[0] / np.linalg.norm(people[0])
    people[0] = query
    expected = _cbgm_reference(arrays, query, people, k, k1=10, k2=3)
    for searcher in (ExactSearcher(arrays.embeddings), FaissSearcher(arrays.embeddings)):
        hits = search(arrays, [{"path": "a", "kind": "image"}], query, k, searcher, people, cbgm=(10, 3))
        assert [h.row for h in hits] == expected[0]
        np.testing.assert_allclose([h.similarity for h in hits], expected[1], rtol=0, atol=1e-12)
    plain = search(arrays, [{"path": "a", "kind": "image"}], query, k)
    assert [h.row for h in plain] != expected[0] or [h.similarity for h in plain] != expected[1]


def test_the_command_line_tools_index_and_search(setup, tmp_path, capsys):
    index_dir = str(tmp_path / "idx")
    argv = ["--cfg", setup["yaml"], "--ckpt", setup["ckpt"], "--index", index_dir, "--no-progress",
            "--min-score", "0", "--every", str(EVERY), "--input", str(setup["pictures"]), setup["video"]]
    info = index_gallery.main(argv)
    assert (info["added"], info["images"]) == (9, 12)
    assert index_gallery.main(argv)["skipped"] == 9  # a second run has nothing to do
    query = sorted(setup["pictures"].glob("*.jpg"))[0]
    box = [20, 10, 70, 110]
    result = search_tool.main(["--index", index_dir, "--query", str(query), "--box", *map(str, box),
                               "--topk", "7", "--out", str(tmp_path / "res")])
    printed = capsys.readouterr().out
    assert "top 7 of" in printed and "numpy search" in printed
    saved = json.loads((tmp_path / "res" / f"{query.stem}.json").read_text())
    assert [h["rank"] for h in saved["hits"]] == list(range(1, 8))
    with Image.open(tmp_path / "res" / f"{query.stem}.jpg") as sheet:
        assert sheet.width > 7 * 100
    # the hits' similarities are the query embedding (embedded on its own here) times the rows'
    arrays = PersonIndex.open(index_dir).load()
    q, _ = embed_query(setup["model"], np.asarray(Image.open(query).convert("RGB")), box, torch.device("cpu"))
    expected = _brute_force(arrays.embeddings, q, 7)
    assert [h["row"] for h in saved["hits"]] == expected[0]
    np.testing.assert_allclose([h["similarity"] for h in saved["hits"]], expected[1], atol=1e-6)
    assert result["hits"][0]["source"] in {s["path"] for s in PersonIndex.open(index_dir).sources}
    with pytest.raises(UserError, match="exists; pass --force"):
        search_tool.main(["--index", index_dir, "--query", str(query), "--box", *map(str, box), "--out",
                          str(tmp_path / "res")])


def test_search_errors_come_before_the_model_is_loaded(setup, tmp_path, monkeypatch):
    index_dir = str(tmp_path / "idx")
    _index(setup, index_dir, [str(setup["pictures"])])
    query = str(sorted(setup["pictures"].glob("*.jpg"))[0])
    monkeypatch.setattr(search_tool, "build_eval_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(UserError, match=r"--box 10 10 200 50 does not fit the query image .* \(160 x 120\)"):
        search_tool.main(["--index", index_dir, "--query", query, "--box", "10", "10", "200", "50"])
    with pytest.raises(UserError, match="query picture not found: .*nope.jpg"):
        search_tool.main(["--index", index_dir, "--query", "nope.jpg", "--box", "1", "1", "5", "5"])
    with pytest.raises(PersonIndexError, match="is not a person-search index"):
        search_tool.main(["--index", str(tmp_path), "--query", query, "--box", "1", "1", "5", "5"])


def test_search_refuses_a_checkpoint_with_other_weights(setup, tmp_path):
    index_dir = str(tmp_path / "idx")
    _index(setup, index_dir, [str(setup["pictures"])])
    torch.manual_seed(1)
    torch.save({"model": build_model(setup["cfg"], "baseline").state_dict()}, tmp_path / "other.pth")
    query = str(sorted(setup["pictures"].glob("*.jpg"))[0])
    with pytest.raises(ModelMismatchError, match="holds other weights"):
        search_tool.main(["--index", index_dir, "--query", query, "--box", "1", "1", "50", "50",
                          "--ckpt", str(tmp_path / "other.pth"), "--out", str(tmp_path / "res")])


def test_index_gallery_errors_come_before_the_model_is_loaded(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(index_gallery, "build_eval_model", lambda *a, **k: pytest.fail("model loaded"))
    base = ["--cfg", setup["yaml"], "--ckpt", setup["ckpt"], "--index", str(tmp_path / "idx"), "--input"]
    with pytest.raises(SourceError, match="missing.mp4 does not exist"):
        index_gallery.main(base + [str(tmp_path / "missing.mp4")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="notes.txt: not a picture"):
        index_gallery.main(base + [str(tmp_path / "notes.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no pictures"):
        index_gallery.main(base + [str(tmp_path / "empty")])
