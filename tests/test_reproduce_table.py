"""tools/reproduce_table.py: the plan, the schedule, the config files, resumability (with a fake
trainer), the table arithmetic, and one real end-to-end --quick run (teacher, student alone,
student + DDPS, one ablation) followed by a second invocation that trains nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch

from configs import dump_config, load_config
from models.distill import term_names
from tools import reproduce_table as rt

QUICK = ["--quick", "--seeds", "0", "--students", "resnet18_x05", "--ablations", "dfd"]


# --------------------------------------------------------------------------------------------
# a fake train_ddps.main: writes what a finished run writes, in no time


class FakeTrainer:
    def __init__(self):
        self.calls = []

    def __call__(self, argv):
        self.calls.append(list(argv))
        args = rt.train_ddps.parse_args(argv)
        cfg = load_config(args.cfg_file, args.opts)
        out = cfg.OUTPUT_DIR
        os.makedirs(out, exist_ok=True)
        last = cfg.SOLVER.MAX_EPOCHS - 1
        if args.eval:
            epochs = []
        else:
            dump_config(cfg, os.path.join(out, "config.yaml"))
            start = 0
            if args.resume:
                start = int(os.path.basename(args.ckpt)[len("epoch_"):-len(".pth")]) + 1
            epochs = range(start, last + 1)
        for e in epochs:
            with open(os.path.join(out, f"epoch_{e}.pth"), "wb") as f:
                f.write(b"x")
        # a deterministic, model-dependent score so the table has something to average
        base = {"teacher": 0.6, "resnet18_x05": 0.4}.get(os.path.basename(out), 0.5)
        value = base + 0.01 * cfg.SEED
        metrics = {"det_recall": value, "det_ap": value, "mAP": value, "top1": value, "top5": value,
                   "top10": value, "epoch": last, "inference_seconds": 0.1}
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        return metrics


@pytest.fixture
def fake(monkeypatch):
    trainer = FakeTrainer()
    monkeypatch.setattr(rt.train_ddps, "main", trainer)
    return trainer


def _trained(calls):
    return [os.path.basename(c[c.index("OUTPUT_DIR") + 1]) for c in calls if "OUTPUT_DIR" in c]


# --------------------------------------------------------------------------------------------
# plan, schedule, configs


def test_default_plan_and_dry_run(tmp_path, capsys):
    out = tmp_path / "t"
    assert rt.main(["--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 seed(s) x 9 models = 27 runs" in text and "240 steps" in text and "estimated time" in text
    settings = rt.make_settings(rt.parse_args([]))
    # the default takes 2-2.75 hours on a quiet 2-core CPU
    assert 120 <= rt.estimate_seconds(rt.build_plan(rt.parse_args([]), settings), settings) / 60 <= 165
    assert not out.exists()  # a dry run writes nothing
    args = rt.parse_args(["--students", "resnet18_x05", "mobilenet_v2"])
    names = [s.name for s in rt.select_specs(args)]
    assert names == ["teacher", "resnet18_x05", "resnet18_x05_ddps"] + [f"resnet18_x05_{a}" for a in rt.ABLATIONS] + [
        "mobilenet_v2", "mobilenet_v2_ddps"]
    assert [s.name for s in rt.select_specs(rt.parse_args(["--no-ablations"]))] == [
        "teacher", "resnet18_x05", "resnet18_x05_ddps"]
    # the ablations bring their reference student; a distilled run brings the teacher
    names = [s.name for s in rt.select_specs(rt.parse_args(["--students", "mobilenet_v2", "--ablations", "ld"]))]
    assert names == ["teacher", "resnet18_x05", "resnet18_x05_ddps", "resnet18_x05_ld", "mobilenet_v2", "mobilenet_v2_ddps"]
    names = [s.name for s in rt.select_specs(rt.parse_args(["--runs", "*_cd"]))]
    assert names == ["teacher", "resnet18_x05_cd", "resnet18_x05_dfd_cd", "resnet18_x05_ld_cd"]
    assert rt.ablation_label("dfd_ld") == "ResNet-18 x0.5 + DFD + LD"
    # the comparison rows: off by default, all six with --comparison, or those named
    specs = rt.select_specs(rt.parse_args(["--comparison", "--no-ablations"]))
    assert [s.name for s in specs] == ["teacher", "resnet18_x05", "resnet18_x05_ddps"] + [
        f"resnet18_x05_{m}" for m in ("pkd", "pkd_ld_cd", "reviewkd", "reviewkd_ld_cd", "cwd", "mgd")]
    assert [s.label for s in specs[3:5]] == ["ResNet-18 x0.5 + PKD", "ResNet-18 x0.5 + PKD + LD + CD"]
    assert all(s.kind == "comparison" and s.distilled and s.student == "resnet18_x05" for s in specs[3:])
    names = [s.name for s in rt.select_specs(rt.parse_args(["--students", "mobilenet_v2", "--no-ablations",
                                                            "--comparison", "mgd"]))]
    assert names == ["teacher", "resnet18_x05", "resnet18_x05_ddps", "resnet18_x05_mgd", "mobilenet_v2",
                     "mobilenet_v2_ddps"]
    args = rt.parse_args(["--comparison", "--no-ablations", "--seeds", "0"])
    settings = rt.make_settings(args)
    plan = rt.build_plan(args, settings)
    assert 35 <= rt.estimate_seconds(plan, settings) / 60 <= 60  # a seed of the comparison fits an hour


def test_schedule():
    assert rt.resolve_schedule(None, None, 400, 4) == (rt.BASE_EPOCHS, rt.BASE_ITERS) == (6, 40)
    assert rt.resolve_schedule(300, None, 400, 4) == (6, 50)
    assert rt.resolve_schedule(450, 9, 400, 4) == (9, 50)
    assert rt.resolve_schedule(None, 4, 400, 4) == (4, 40)
    assert rt.resolve_schedule(None, None, 8, 4) == (6, 2)  # a smaller world: whole epochs
    assert rt.resolve_schedule(1000, None, 400, 4) == (10, 100)  # an epoch holds 100 steps
    with pytest.raises(SystemExit):
        rt.resolve_schedule(1000, 2, 400, 4)
    assert rt.decay_milestones(6) == [5] and rt.decay_milestones(1) == [] and rt.decay_milestones(2) == [1]
    assert rt.decay_milestones(12) == [10]
    settings = rt.make_settings(rt.parse_args(["--steps", "120", "--epochs", "3"]))
    assert (settings.epochs, settings.iters_per_epoch, settings.milestones) == (3, 40, [2])
    run = rt.Run(1, rt.model_specs(["resnet18_x05"], [])[2], "o")
    argv = rt.train_argv(run, settings)
    opts = dict(zip(argv[2::2], argv[3::2]))
    assert opts["SEED"] == "1" and opts["SOLVER.MAX_EPOCHS"] == "3" and opts["SOLVER.MAX_ITERS_PER_EPOCH"] == "40"
    # the teacher trains twice the students' epochs, with its own LR decay
    assert opts["DISTILLER.TEACHER.CKPT"] == os.path.join("o", "seed1", "teacher", "epoch_5.pth")
    teacher_argv = rt.train_argv(rt.Run(1, rt.TEACHER, "o"), settings)
    teacher_opts = dict(zip(teacher_argv[2::2], teacher_argv[3::2]))
    assert (teacher_opts["SOLVER.MAX_EPOCHS"], teacher_opts["SOLVER.MAX_ITERS_PER_EPOCH"]) == ("6", "40")
    assert teacher_opts["SOLVER.LR_DECAY_MILESTONES"] == "[5]" and opts["SOLVER.LR_DECAY_MILESTONES"] == "[2]"
    assert settings.run_steps(rt.TEACHER) == 240 and settings.run_steps(run.spec) == settings.steps == 120
    assert opts["INPUT.DATA_ROOT"] == os.path.join("o", "seed1", "world", "CUHK-SYSU")
    load_config(argv[1], argv[2:])  # the overrides load
    # the same runs reached through another path are the same runs; other steps are not
    moved = rt.train_argv(rt.Run(1, run.spec, os.path.abspath("o")), settings)
    assert moved != argv and rt.settings_signature(moved) == rt.settings_signature(argv)
    other = rt.train_argv(run, rt.make_settings(rt.parse_args(["--steps", "60", "--epochs", "3"])))
    assert rt.settings_signature(other) != rt.settings_signature(argv)


def spec_distilled(name):
    return name.endswith("_ddps") or any(name.endswith("_" + a) for a in list(rt.ABLATIONS) + list(rt.COMPARISONS))


def test_table_configs_share_data_steps_and_schedule():
    specs = rt.model_specs(list(rt.STUDENTS), list(rt.ABLATIONS), list(rt.COMPARISONS))
    cfgs = {s.name: load_config(s.cfg_file) for s in specs}
    assert sorted(f[:-5] for f in os.listdir(rt.CONFIG_DIR)) == sorted(cfgs)
    ref = cfgs["resnet18_x05"]
    for name, cfg in cfgs.items():
        for section in ("INPUT", "MODEL"):
            assert cfg[section] == ref[section], (name, section)
        solver = cfg.SOLVER.clone()
        solver.defrost()
        if name == "teacher":  # twice the epochs, its LR decay for its own last sixth
            assert solver.MAX_EPOCHS == rt.TEACHER_EPOCH_FACTOR * ref.SOLVER.MAX_EPOCHS
            assert list(solver.LR_DECAY_MILESTONES) == rt.decay_milestones(solver.MAX_EPOCHS)
            solver.MAX_EPOCHS, solver.LR_DECAY_MILESTONES = ref.SOLVER.MAX_EPOCHS, ref.SOLVER.LR_DECAY_MILESTONES
        assert solver == ref.SOLVER, name
        if spec_distilled(name):
            assert cfg.DISTILLER.TEACHER.CKPT.endswith(f"teacher/epoch_{cfgs['teacher'].SOLVER.MAX_EPOCHS - 1}.pth")
        for key in ("EVAL_GALLERY_SIZE", "EVAL_START_EPOCH", "CKPT_PERIOD", "SEED"):
            assert cfg[key] == ref[key], (name, key)
    ref = cfgs["teacher"]
    assert ref.BASELINE.BACKBONE_NAME == "resnet18" and not ref.DISTILLER.PROJECT
    assert ref.MODEL.LOSS.LUT_SIZE >= rt.world_options({}).train_ids
    for spec in specs:
        cfg = cfgs[spec.name]
        if spec.distilled:
            assert cfg.DISTILLER.PROJECT and cfg.DISTILLER.TYPE == "FGD_DKD_Relation"
            assert cfg.DISTILLER.STUDENT.BACKBONE_NAME == spec.backbone
            assert cfg.DISTILLER.TEACHER.BACKBONE_NAME == "resnet18"
            # the ablations and comparison methods name their terms in DISTILLER.TERMS; the DDPS
            # runs take DISTILLER.TYPE's
            if spec.kind in ("ablation", "comparison"):
                terms = spec.name[len(rt.ABLATION_STUDENT) + 1:].split("_")
                assert list(cfg.DISTILLER.TERMS) == terms, spec.name
            else:
                terms = ["dfd", "ld", "cd"]
                assert list(cfg.DISTILLER.TERMS) == [], spec.name
            assert term_names(cfg) == terms, spec.name
        else:
            assert not cfg.DISTILLER.PROJECT and cfg.BASELINE.BACKBONE_NAME == spec.backbone
            assert not cfg.BASELINE.BACKBONE_PRETRAIN


def test_hard_world_preset():
    opts = rt.world_options({})
    assert (opts.train_ids, opts.test_ids) == (60, 60)
    assert (opts.image_width, opts.image_height) == (256, 192)
    assert opts.num_colors <= 8 and opts.num_patterns <= 3 and opts.clutter_palette > 0
    assert opts.occlusion > 0 and opts.person_scale[1] / opts.person_scale[0] >= 2


def test_summary_means_and_paired_gains():
    specs = rt.model_specs(["resnet18_x05"], [])
    rows = []
    for seed, (t, a, d) in enumerate([(0.6, 0.4, 0.5), (0.7, 0.5, 0.54)]):
        for spec, v in zip(specs, (t, a, d)):
            rows.append({"seed": seed, "name": spec.name, "kind": spec.kind, "student": spec.student,
                         "status": "done", "train_seconds": 60.0, **{k: v for k in rt.METRIC_KEYS}})
    summary = {e["name"]: e for e in rt.summarise(rows, specs)}
    assert summary["teacher"]["mAP"]["mean"] == pytest.approx(0.65)
    assert summary["teacher"]["mAP"]["std"] == pytest.approx(0.0707107, rel=1e-5)  # sample std
    gain = summary["resnet18_x05_ddps"]["mAP_gain_over_alone"]
    assert gain["mean"] == pytest.approx(0.07) and gain["std"] == pytest.approx(0.0424264, rel=1e-5)
    assert summary["resnet18_x05"]["train_minutes"]["mean"] == pytest.approx(1.0)
    settings = rt.make_settings(rt.parse_args(["--seeds", "0", "1"]))
    md = rt.format_markdown(rt.summarise(rows, specs), rows, settings, 0.0)
    assert "| ResNet-18 x0.5 + DDPS | 2 | 52.0 ± 2.8 |" in md and "+7.0 ± 4.2" in md


# --------------------------------------------------------------------------------------------
# resumability, with the fake trainer


def test_reuse_restart_resume_and_settings_check(tmp_path, fake, monkeypatch):
    out = str(tmp_path / "t")
    argv = QUICK + ["--out", out, "--steps", "6", "--epochs", "3"]
    assert rt.main(argv) == 0
    assert _trained(fake.calls) == ["teacher", "resnet18_x05", "resnet18_x05_ddps", "resnet18_x05_dfd"]
    run_dir = os.path.join(out, "seed0", "resnet18_x05_dfd")
    # only the last checkpoint of a finished run is kept
    assert sorted(f for f in os.listdir(run_dir) if f.endswith(".pth")) == ["epoch_2.pth"]
    data = json.load(open(os.path.join(out, "table.json")))
    assert [r["status"] for r in data["runs"]] == ["done"] * 4
    assert data["settings"]["steps"] == 6

    # finished runs are reused
    fake.calls.clear()
    assert rt.main(argv) == 0 and fake.calls == []

    # a run interrupted after its first epoch: restarted from scratch by default ...
    for name in ("metrics.json", "epoch_2.pth"):
        os.remove(os.path.join(run_dir, name))
    with open(os.path.join(run_dir, "epoch_0.pth"), "wb") as f:
        f.write(b"x")
    assert rt.run_state(rt.Run(0, rt.model_specs(["resnet18_x05"], ["dfd"])[3], out), rt.make_settings(rt.parse_args(argv))) == "partial"
    assert rt.main(argv) == 0
    assert len(fake.calls) == 1 and "--resume" not in fake.calls[0]
    # ... or continued with --resume
    fake.calls.clear()
    for name in ("metrics.json", "epoch_2.pth"):
        os.remove(os.path.join(run_dir, name))
    with open(os.path.join(run_dir, "epoch_1.pth"), "wb") as f:
        f.write(b"x")
    assert rt.main(argv + ["--resume"]) == 0
    (call,) = fake.calls
    assert call[call.index("--ckpt") + 1] == os.path.join(run_dir, "epoch_1.pth") and "--resume" in call

    # trained but not evaluated (cut short in the evaluation): only evaluated
    fake.calls.clear()
    os.remove(os.path.join(run_dir, "metrics.json"))
    assert rt.main(argv) == 0
    (call,) = fake.calls
    assert "--eval" in call and call[call.index("--cfg") + 1] == os.path.join(run_dir, "config.yaml")

    # other settings in the same folder stop the command; --redo trains again
    with pytest.raises(rt.SettingsMismatch, match="other settings"):
        rt.main(QUICK + ["--out", out, "--steps", "4", "--epochs", "2"])
    fake.calls.clear()
    argv = QUICK + ["--out", out, "--steps", "4", "--epochs", "2"]
    assert rt.main(argv + ["--redo"]) == 0
    assert len(fake.calls) == 4

    # a teacher trained again makes its students stale
    assert rt.main(argv + ["--runs", "teacher", "--redo"]) == 0
    with pytest.raises(rt.SettingsMismatch, match="another checkpoint of its teacher"):
        rt.main(argv)


def test_a_failed_run_is_reported_and_its_dependents_skipped(tmp_path, monkeypatch):
    def broken(argv):
        raise RuntimeError("boom")

    monkeypatch.setattr(rt.train_ddps, "main", broken)
    out = tmp_path / "t"
    assert rt.main(QUICK + ["--out", str(out), "--no-ablations"]) == 1
    data = json.load(open(out / "table.json"))
    status = {r["name"]: r for r in data["runs"]}
    assert status["teacher"]["status"] == "failed" and "boom" in status["teacher"]["error"]
    assert "teacher" in status["resnet18_x05_ddps"]["error"]
    assert "Not in the table" in (out / "table.md").read_text()


# --------------------------------------------------------------------------------------------
# the real thing, in miniature


@pytest.mark.slow
def test_quick_end_to_end_then_nothing_is_redone(tmp_path, monkeypatch):
    out = tmp_path / "table"
    # one thread: two threads on two cores shared with other busy processes are several times slower
    # --comparison: every comparison method trains and is evaluated from the table's own configs
    argv = QUICK + ["--comparison", "--out", str(out), "--threads", "1"]
    assert rt.main(argv) == 0
    md = (out / "table.md").read_text()
    for row in ("| teacher ResNet-18 | 1 |", "| ResNet-18 x0.5 | 1 |", "| ResNet-18 x0.5 + DDPS | 1 |",
                "| ResNet-18 x0.5 + DFD | 1 |", "| ResNet-18 x0.5 + ReviewKD + LD + CD | 1 |", "| ResNet-18 x0.5 + MGD | 1 |"):
        assert row in md
    data = json.load(open(out / "table.json"))
    assert [r["name"] for r in data["runs"]] == ["teacher", "resnet18_x05", "resnet18_x05_ddps", "resnet18_x05_dfd"] + [
        f"resnet18_x05_{m}" for m in rt.COMPARISONS]
    for name, parts in (("resnet18_x05_reviewkd_ld_cd", {"student", "reviewkd"}), ("resnet18_x05_mgd", {"student", "mgd"}),
                        ("resnet18_x05_pkd", {"student"})):  # equal FPN widths: PKD has no align conv to save
        ckpt = torch.load(out / "seed0" / name / "epoch_0.pth", map_location="cpu", weights_only=True)
        assert set(ckpt["model"]) == parts, name
    for r in data["runs"]:
        assert r["status"] == "done" and r["train_seconds"] > 0
        assert all(0.0 <= r[k] <= 1.0 for k in rt.METRIC_KEYS)
        assert os.path.isfile(r["checkpoint"])
    cfg = load_config(str(out / "seed0" / "resnet18_x05_ddps" / "config.yaml"))
    # --quick: one epoch of 2 steps per student, the teacher twice that
    assert cfg.DISTILLER.TEACHER.CKPT == str(out / "seed0" / "teacher" / "epoch_1.pth")
    assert cfg.SOLVER.MAX_ITERS_PER_EPOCH == 2 and cfg.SOLVER.MAX_EPOCHS == 1
    teacher_cfg = load_config(str(out / "seed0" / "teacher" / "config.yaml"))
    assert teacher_cfg.SOLVER.MAX_EPOCHS == 2 and list(teacher_cfg.SOLVER.LR_DECAY_MILESTONES) == [1]
    assert (out / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def must_not_train(argv):
        raise AssertionError(f"train_ddps.main called again: {argv}")

    monkeypatch.setattr(rt.train_ddps, "main", must_not_train)
    assert rt.main(argv) == 0
    assert json.load(open(out / "table.json"))["runs"] == data["runs"]
