"""The README's main job, end to end in its --quick form (two iterations per model)."""
import json
import os

from PIL import Image

from datasets import build_dataset

from tests.helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from tools import quickstart


def test_quickstart_runs_every_stage(synthetic_root, tmp_path, capsys):
    out = tmp_path / "quick"
    quickstart.main(["--data", str(synthetic_root), "--out", str(out), "--quick", "--threads", "1"])
    printed = capsys.readouterr().out
    for stage in ("1. synthetic data", "2. protocols", "3. teacher", "4. student", "5. student", "6. the three",
                  "7. demo", "8. index the gallery"):
        assert stage in printed
    baseline = json.load(open(out / "histogram_baseline.json"))
    assert {r["dataset"] for r in baseline} == {"CUHK-SYSU", "PRW"}
    assert all(r["det_recall"] == 1.0 for r in baseline)  # ground-truth boxes
    rows = json.load(open(out / "table.json"))
    assert [r["model"] for r in rows] == [label for label, _, _ in quickstart.RUNS]
    teacher, student, ddps = rows
    assert teacher["parameters"] > student["parameters"] == ddps["parameters"]
    for r in rows:
        assert 0 <= r["mAP"] <= 1 and r["ms_per_image"] > 0
    with Image.open(out / "demo" / "demo.jpg") as im:
        assert im.width > im.height > 0
    # stage 8: the gallery but the query's own picture indexed, one search, its hits marked
    listed = (out / "search" / "gallery_files.txt").read_text().split()
    search = json.load(open(out / "search" / "query.json"))
    truth = json.load(open(out / "search" / "query_ground_truth.json"))
    assert truth["indexed_pictures"] == len(listed) and os.path.abspath(search["query"]) not in listed
    assert len(truth["same_identity"]) == len(search["hits"]) <= quickstart.SEARCH_TOPK
    assert {h["source"] for h in search["hits"]} <= set(listed)
    gallery = build_dataset("CUHK-SYSU", str(synthetic_root / "CUHK-SYSU"), None, "gallery")
    query = build_dataset("CUHK-SYSU", str(synthetic_root / "CUHK-SYSU"), None, "query")
    most = max(sum(q["pids"][0] in a["pids"] for a in gallery.annotations if a["img_name"] != q["img_name"])
               for q in query.annotations)
    assert truth["pictures_holding_it"] == most  # the query whose identity is in the most pictures
    with Image.open(out / "search" / "query_ground_truth.jpg") as im:
        assert im.width > 0
    # a second run reuses the trained models instead of training again
    quickstart.main(["--data", str(synthetic_root), "--out", str(out), "--quick", "--threads", "1"])
    printed = capsys.readouterr().out
    assert printed.count("already trained") == 3
    assert f"skipped {len(listed)} done" in printed  # the index is not made again
    assert os.path.isfile(out / "table.txt")
    # a later evaluation with other settings in a run's folder (here: CBGM) never reaches the table
    metrics_path = out / "teacher" / "metrics.json"
    other = dict(json.load(open(metrics_path)), cbgm=True, mAP=0.999)
    metrics_path.write_text(json.dumps(other))
    quickstart.main(["--data", str(synthetic_root), "--out", str(out), "--quick", "--threads", "1"])
    printed = capsys.readouterr().out
    assert f"{metrics_path} is not an evaluation of" in printed
    again = json.load(open(out / "table.json"))
    assert again[0]["mAP"] == teacher["mAP"] and again[1:] == rows[1:]
    assert json.load(open(metrics_path)) == other  # the user's file is left as it is
