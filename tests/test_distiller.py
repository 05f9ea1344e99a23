"""The DDPS distiller (SPEC 6): data flow, frozen teacher, gradients, checkpoints, error paths."""
import os

import pytest
import torch

from configs import load_config
from engine.build import build_eval_model
from models import build_model
from models.checkpoint import CheckpointMismatchError
from models.distill import DFDLoss, cd_loss, ld_loss
from models.distill.distiller import DDPSDistiller, build_distiller, dfd_name
from tests.helpers import one_torch_thread  # noqa: F401  (autouse fixture)
from tests.helpers import small_opts

TEACHER = "resnet18_x05"  # CPU-sized; SPEC's teacher is resnet50, the wiring is the same
STUDENT = "resnet18_x05"


def distill_opts(world, teacher_ckpt, output_dir=None, **overrides):
    opts = small_opts(world, output_dir=output_dir, **overrides)
    opts += ["BASELINE.PROJECT", "False", "DISTILLER.PROJECT", "True", "DISTILLER.TYPE", "FGD_DKD_Relation",
             "DISTILLER.TEACHER.BACKBONE_NAME", TEACHER, "DISTILLER.TEACHER.BACKBONE_PRETRAIN", "False",
             "DISTILLER.TEACHER.FROZENBN2d", "False", "DISTILLER.TEACHER.CKPT", str(teacher_ckpt),
             "DISTILLER.STUDENT.BACKBONE_NAME", STUDENT, "DISTILLER.STUDENT.BACKBONE_PRETRAIN", "False",
             "DISTILLER.STUDENT.FROZENBN2d", "False"]
    return opts


@pytest.fixture(scope="module")
def teacher_ckpt(synthetic_root, tmp_path_factory):
    """A teacher checkpoint in the original single-model layout, with non-trivial OIM tables."""
    torch.manual_seed(0)
    cfg = load_config(None, small_opts(synthetic_root, BASELINE__BACKBONE_NAME=TEACHER))
    teacher = build_model(cfg)
    lut = torch.nn.functional.normalize(torch.randn_like(teacher.roi_heads.reid_loss.lut), dim=1)
    cq = torch.nn.functional.normalize(torch.randn_like(teacher.roi_heads.reid_loss.cq), dim=1)
    teacher.roi_heads.reid_loss.lut.copy_(lut)
    teacher.roi_heads.reid_loss.cq.copy_(cq)
    path = tmp_path_factory.mktemp("teacher") / "epoch_19.pth"
    torch.save({"model": teacher.state_dict(), "epoch": 19}, path)
    return path


def batch(synthetic_root, cfg, n=2):
    from datasets import build_dataset
    from datasets.transforms import build_transforms

    ds = build_dataset("CUHK-SYSU", cfg.INPUT.DATA_ROOT, build_transforms(False), "train")
    items = [ds[i] for i in range(n)]
    return [im for im, _ in items], [t for _, t in items]


def test_teacher_frozen_and_gradients_reach_student_and_dfd_only(synthetic_root, teacher_ckpt):
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt))
    distiller = build_distiller(cfg, log=lambda *a: None)
    distiller.train()
    assert not distiller.teacher.training, "the teacher must stay in eval mode"
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    images, targets = batch(synthetic_root, cfg)
    opt = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        losses = distiller(images, targets)
        assert {"loss_dfd", "loss_ld", "loss_cd"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        # gradients: the student and DFD's parts, never the teacher
        assert all(p.grad is None for p in distiller.teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
        dfd_grads = [p.grad for p in distiller.fgd.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in dfd_grads)
        opt.step()
    # weights, BatchNorm statistics and OIM tables of the teacher are untouched
    after = distiller.teacher.state_dict()
    changed = [k for k, v in teacher_before.items() if not torch.equal(v, after[k])]
    assert changed == []
    assert torch.equal(after["roi_heads.reid_loss.lut"], torch.load(teacher_ckpt)["model"]["roi_heads.reid_loss.lut"])


def test_terms_follow_the_data_flow(synthetic_root, teacher_ckpt):
    """Each distillation loss equals its term recomputed from the student's TrainRecord and the
    teacher's outputs on the student's transformed batch, proposals and boxes (SPEC 6)."""
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt))
    distiller = build_distiller(cfg, log=lambda *a: None)
    distiller.train()
    images, targets = batch(synthetic_root, cfg)
    torch.manual_seed(5)
    losses = distiller(images, targets)
    torch.manual_seed(5)
    distiller.student.train()
    _, rec = distiller.student.forward_train(images, targets)
    teacher = distiller.teacher
    with torch.no_grad():
        t_feats = teacher.extract_features(rec.images.tensors)
        t_logits = teacher.roi_heads.proposal_logits(t_feats, rec.proposals, rec.images.image_sizes)
        t_emb = teacher.roi_heads.box_embeddings(t_feats, rec.reid_boxes, rec.images.image_sizes)
    boxes = [t["boxes"] for t in rec.targets]
    size = tuple(rec.images.tensors.shape[-2:])
    dfd = sum(distiller.fgd[dfd_name(l)](rec.features[l], t_feats[l], boxes, size) for l in "0123")
    torch.testing.assert_close(losses["loss_dfd"], dfd)
    ld = ld_loss(rec.proposal_logits, t_logits, torch.cat(rec.proposal_labels), 1.0, 0.5, 4.0)
    torch.testing.assert_close(losses["loss_ld"], ld)
    # CD: with pairwise-distinct boxes per id the selection keeps every foreground box whose
    # same-id duplicates are suppressed; recompute it literally from SPEC 6
    labels = torch.cat(rec.reid_labels)
    fg = labels > 0
    probs = torch.softmax(teacher.roi_heads.reid_loss.logits(t_emb[fg]), dim=1)
    lut = cfg.MODEL.LOSS.LUT_SIZE
    from torchvision.ops import nms

    fg_idx = torch.nonzero(fg).squeeze(1)
    img_of = torch.cat([torch.full((len(b),), i) for i, b in enumerate(rec.reid_boxes)])
    all_boxes = torch.cat(rec.reid_boxes)
    kept = []
    for img in img_of[fg_idx].unique().tolist():
        for pid in labels[fg_idx][img_of[fg_idx] == img].unique().tolist():
            sel = torch.nonzero((img_of[fg_idx] == img) & (labels[fg_idx] == pid)).squeeze(1)
            p = probs[sel]
            score = p[:, pid - 1] if pid <= lut else p[:, lut:].max(dim=1).values
            b = all_boxes[fg_idx[sel]]
            ok = ((b[:, 2] - b[:, 0]) >= 0.01) & ((b[:, 3] - b[:, 1]) >= 0.01)
            keep = nms(b[ok], score[ok], 0.7)
            kept += fg_idx[sel[ok][keep]].tolist()
    kept = torch.tensor(sorted(kept), dtype=torch.long)
    assert len(kept) > 0
    cd = 0.01 * cd_loss(rec.embeddings[kept], t_emb[kept])
    torch.testing.assert_close(losses["loss_cd"], cd)


def test_switches_and_weights(synthetic_root, teacher_ckpt):
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt) + [
        "FGD.ENABLED", "False", "GRAPHRELA.ENABLED", "False", "DKD.WEIGHT", "0"])
    distiller = build_distiller(cfg, log=lambda *a: None)
    assert len(distiller.fgd) == 0
    distiller.train()
    images, targets = batch(synthetic_root, cfg)
    losses = distiller(images, targets)
    assert "loss_dfd" not in losses and "loss_cd" not in losses
    assert float(losses["loss_ld"].detach()) == 0.0


def test_checkpoint_layout_and_student_evaluation(synthetic_root, teacher_ckpt, tmp_path):
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt, output_dir=tmp_path))
    distiller = build_distiller(cfg, log=lambda *a: None)
    state = distiller.checkpoint_state()
    assert set(state) == {"student", "fgd"}
    assert set(state["fgd"]) == {dfd_name(l) for l in "0123"}
    assert "conv_mask_s.weight" in state["fgd"][dfd_name("0")]
    path = tmp_path / "epoch_0.pth"
    torch.save({"model": state, "epoch": 0}, path)
    # evaluation needs no teacher: point the teacher at nothing and load the student alone
    eval_cfg = load_config(None, distill_opts(synthetic_root, "/nonexistent/teacher.pth", output_dir=tmp_path))
    model, info = build_eval_model(eval_cfg, str(path), torch.device("cpu"), log=lambda *a: None)
    assert info["role"] == "student"
    for k, v in distiller.student.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # resume: a fresh distiller takes the student and DFD parts back
    other = build_distiller(cfg, log=lambda *a: None)
    other.load_checkpoint_state(state)
    for name, module in distiller.fgd.items():
        for k, v in module.state_dict().items():
            assert torch.equal(other.fgd[name].state_dict()[k], v)


def test_missing_teacher_checkpoint(synthetic_root, tmp_path):
    cfg = load_config(None, distill_opts(synthetic_root, tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth.*DISTILLER.TEACHER.CKPT"):
        build_distiller(cfg, log=lambda *a: None)
    cfg = load_config(None, distill_opts(synthetic_root, ""))
    with pytest.raises(ValueError, match="DISTILLER.TEACHER.CKPT is empty"):
        build_distiller(cfg, log=lambda *a: None)


def test_teacher_of_another_architecture(synthetic_root, teacher_ckpt):
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["DISTILLER.TEACHER.BACKBONE_NAME", "resnet18"])
    with pytest.raises(CheckpointMismatchError, match=r"teacher checkpoint .*epoch_19.pth does not fit.*resnet18"):
        build_distiller(cfg, log=lambda *a: None)


def test_teacher_without_oim_tables_is_refused(synthetic_root, teacher_ckpt, tmp_path):
    """The original dropped the teacher's OIM tables; here they are required (CD scores them)."""
    sd = torch.load(teacher_ckpt)["model"]
    sd = {k: v for k, v in sd.items() if not k.startswith("roi_heads.reid_loss.")}
    path = tmp_path / "no_tables.pth"
    torch.save({"model": sd}, path)
    cfg = load_config(None, distill_opts(synthetic_root, path))
    with pytest.raises(CheckpointMismatchError, match="reid_loss.lut"):
        build_distiller(cfg, log=lambda *a: None)


def test_unknown_distiller_type(synthetic_root, teacher_ckpt):
    cfg = load_config(None, distill_opts(synthetic_root, teacher_ckpt) + ["DISTILLER.TYPE", "PKD"])
    with pytest.raises(NotImplementedError, match="PKD"):
        build_distiller(cfg, log=lambda *a: None)


def test_short_distillation_run_end_to_end(synthetic_root, teacher_ckpt, tmp_path):
    import json

    import train_ddps

    out = tmp_path / "run"
    opts = distill_opts(synthetic_root, teacher_ckpt, output_dir=out, SOLVER__MAX_ITERS_PER_EPOCH=2)
    metrics = train_ddps.main(opts)
    assert os.path.isfile(out / "epoch_0.pth")
    ckpt = torch.load(out / "epoch_0.pth", weights_only=True)
    assert set(ckpt["model"]) == {"student", "fgd"}
    saved = json.load(open(out / "metrics.json"))
    for k in ("det_recall", "det_ap", "mAP", "top1", "top5", "top10"):
        assert 0.0 <= saved[k] <= 1.0
    assert metrics["mAP"] == saved["mAP"]
