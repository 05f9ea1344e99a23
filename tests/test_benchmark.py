"""tools/benchmark.py in --quick mode: the report's fields, SPEC 4.2 parameter counts, FLOPs and
timings that are positive. The quick run uses tiny images and RPN / RoI settings; parameter
counts do not depend on them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tools import benchmark

# SPEC 4.2 totals, with each model's own CUHK-SYSU base config (FROZENBN2d as there)
SPEC_TOTALS = {
    "resnet50": 56_993_651,
    "resnet18": 43_915_251,       # FrozenBatchNorm2d
    "resnet18_x05": 35_424_339,   # FROZENBN2d False
    "mobilenet_v2": 34_435_123,
}


@pytest.fixture(scope="module")
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, restore_threads):
    out = tmp_path_factory.mktemp("benchmark")
    benchmark.main(["--quick", "--models", "resnet18_x05", "--threads", "1", "--profile", "--out", str(out)])
    with open(out / "benchmark.json") as f:
        data = json.load(f)
    return data, (out / "benchmark.md").read_text()


def test_quick_run_json(quick_run):
    data, _ = quick_run
    m = data["machine"]
    for key in ("cpu", "cpu_cores", "torch", "torchvision", "device", "torch_threads"):
        assert m[key], key
    assert m["device"] == "cpu" or m["device"].startswith("cuda")
    assert data["settings"]["quick"] is True

    r = data["models"]["resnet18_x05"]
    p = r["params"]
    assert p["total"] == SPEC_TOTALS["resnet18_x05"]
    assert p["matches_spec"] is True
    assert p["norm"] == "BatchNorm2d"
    assert 0 < p["trainable"] < p["total"]  # the frozen stem
    assert set(p["parts"]) == set(benchmark.PARTS)
    assert sum(v["total"] for v in p["parts"].values()) == p["total"]

    f = r["flops"]
    assert f["total"] > 0 and f["backbone_fpn"] > 0
    assert f["backbone_fpn"] <= f["total"]
    assert f["parts"]["backbone.body"] + f["parts"]["backbone.fpn"] == f["backbone_fpn"]
    assert all(v > 0 for v in f["parts"].values())
    assert sum(f["parts"].values()) <= f["total"]
    assert f["input"] == [3, *benchmark.QUICK_SIZE]

    for section in ("inference", "train"):
        t = r[section]
        assert t["median_s"] > 0 and len(t["samples_s"]) == data["settings"]["repeats"]
    assert r["train"]["batch"] == data["settings"]["batch"]

    d = data["ddps"]["resnet18_x05"]
    for key in ("student_step", "teacher_forward", "ddps_step"):
        assert d[key]["median_s"] > 0
    assert math.isfinite(d["overhead_pct"])
    s, t, ddps = (d[k]["median_s"] for k in ("student_step", "teacher_forward", "ddps_step"))
    assert d["overhead_s"] == pytest.approx(ddps - (s + t))
    assert isinstance(d["target_met"], bool)
    assert d["proposals"] > 0 and d["reid_boxes"] > 0
    comps = d["components_s"]
    for level in "0123":
        assert comps[f"DFD level {level} (fwd+bwd)"] > 0
    assert comps["LD (fwd+bwd)"] > 0
    assert any(k.startswith("CD:") and v > 0 for k, v in comps.items())
    prof = d["profile"]
    assert prof["DDPS step"]["regions_ms"]["step: backward"]["ms"] > 0
    assert "teacher: backbone + FPN" in prof["DDPS step"]["regions_ms"]
    assert "teacher: backbone + FPN" not in prof["student step"]["regions_ms"]
    assert prof["DDPS step"]["top_ops"]

    ev = data["evaluation"]["rows"]
    settings = {(row["dataset"], row["setting"]) for row in ev}
    assert ("CUHK-SYSU", "search, gallery 100") in settings
    assert ("PRW", "search, cross-camera + CBGM") in settings
    assert all(row["seconds"] >= 0 for row in ev)


def test_quick_run_markdown(quick_run):
    _, md = quick_run
    for text in ("## Parameters", "## FLOPs", "## Inference time", "## Training step", "## DDPS distillation step",
                 "## Evaluation protocols", "| CPU |", "torch", "35,424,339", "backbone + FPN (deterministic)",
                 "overhead"):
        assert text in md, text
    assert "--quick run" in md


def test_parameter_counts_of_the_other_models(tmp_path, restore_threads):
    data = benchmark.main(["--quick", "--models", "resnet50", "resnet18", "mobilenetV2", "--parts", "params",
                           "--out", str(tmp_path)])
    assert set(data["models"]) == {"resnet50", "resnet18", "mobilenet_v2"}
    for name, entry in data["models"].items():
        assert entry["params"]["total"] == SPEC_TOTALS[name], name
        assert entry["params"]["matches_spec"] is True, name
        assert set(entry) == {"params"}
    assert data["models"]["resnet18"]["params"]["norm"] == "FrozenBatchNorm2d"
    assert data["models"]["resnet50"]["params"]["norm"] == "BatchNorm2d"
    assert not data["ddps"] and "evaluation" not in data
    md = (tmp_path / "benchmark.md").read_text()
    assert "43,915,251" in md and "56,993,651" in md and "34,435,123" in md


def test_eval_from_bench_eval_json(tmp_path, restore_threads):
    rows = [{"dataset": "CUHK-SYSU", "setting": "search, gallery 100", "seconds": 0.5, "mAP": 0.7, "top1": 0.8}]
    src = tmp_path / "bench_eval.json"
    src.write_text(json.dumps({"cpu_count": 2, "repeat": 1, "rows": rows}))
    data = benchmark.main(["--quick", "--models", "resnet18_x05", "--parts", "eval", "--eval-from", str(src),
                           "--out", str(tmp_path / "out")])
    assert data["evaluation"]["rows"] == rows
    assert "search, gallery 100 | 0.500" in (tmp_path / "out" / "benchmark.md").read_text()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_run_on_cuda(tmp_path, restore_threads):
    """The CUDA path: synchronised timings, the GPU named in the report, peak GPU memory recorded."""
    data = benchmark.main(["--quick", "--device", "cuda", "--models", "resnet18_x05", "--parts", "params", "flops",
                           "inference", "train", "ddps", "--out", str(tmp_path)])
    assert data["machine"]["device"].startswith("cuda") and data["machine"]["gpu"]
    r = data["models"]["resnet18_x05"]
    assert r["params"]["total"] == SPEC_TOTALS["resnet18_x05"]
    for section in ("inference", "train"):
        assert r[section]["median_s"] > 0
        assert r[section]["peak_gib"] > 0
    d = data["ddps"]["resnet18_x05"]
    assert d["ddps_step"]["median_s"] > 0 and math.isfinite(d["overhead_pct"])
    md = (tmp_path / "benchmark.md").read_text()
    assert "| GPU |" in md and "torch.cuda.synchronize" in md
