"""Tests of models/: parameter counts (SPEC 4.2), names (SPEC 4.4), training/inference paths,
OIM (SPEC 4.1) and ImageNet weight loading (SPEC 4.3). CPU, tiny images."""

import math
import os
import urllib.error

import pytest
import torch
import torchvision
from torchvision.ops import boxes as box_ops

import models
from models import backbones as backbones_mod
from models.backbones import HalfWidthResNet18
from models.oim import OIMLoss, UNLABELED_PID
from models.seqnet import LOSS_KEYS, TrainRecord, _anchor_settings


# ---------------------------------------------------------------------------------- helpers
def _local_default_cfg():
    """Fallback when configs/ is not importable: the keys models/ reads, with SPEC 2 defaults."""
    from yacs.config import CfgNode as CN
    c = CN()
    c.INPUT = CN(dict(MIN_SIZE=900, MAX_SIZE=1500))
    c.SOLVER = CN(dict(LW_RPN_REG=1.0, LW_RPN_CLS=1.0, LW_PROPOSAL_REG=10.0, LW_PROPOSAL_CLS=1.0,
                       LW_BOX_REG=1.0, LW_BOX_CLS=1.0, LW_BOX_REID=1.0))
    c.MODEL = CN()
    c.MODEL.ANCHOR_SIZES = [[32], [64], [128], [256], [512]]
    c.MODEL.ANCHOR_ASPECT_RATIOS = [[0.5, 1.0, 2.0]] * 5
    c.MODEL.RPN = CN(dict(NMS_THRESH=0.7, BATCH_SIZE_TRAIN=256, POS_FRAC_TRAIN=0.5,
                          POS_THRESH_TRAIN=0.7, NEG_THRESH_TRAIN=0.3, PRE_NMS_TOPN_TRAIN=12000,
                          PRE_NMS_TOPN_TEST=6000, POST_NMS_TOPN_TRAIN=2000,
                          POST_NMS_TOPN_TEST=300, SCORE_THRESH=0.0))
    c.MODEL.ROI_HEAD = CN(dict(BN_NECK=True, BATCH_SIZE_TRAIN=128, POS_FRAC_TRAIN=0.5,
                               POS_THRESH_TRAIN=0.5, NEG_THRESH_TRAIN=0.5, SCORE_THRESH_TEST=0.5,
                               NMS_THRESH_TEST=0.4, DETECTIONS_PER_IMAGE_TEST=300))
    c.MODEL.LOSS = CN(dict(LUT_SIZE=5532, CQ_SIZE=5000, OIM_MOMENTUM=0.5, OIM_SCALAR=30.0))
    node = dict(BACKBONE_NAME="resnet50", BACKBONE_PRETRAIN=True, BACKBONE_WEIGHTS="",
                FROZENBN2d=True, FREEZE=True)
    c.BASELINE = CN(node)
    c.DISTILLER = CN()
    c.DISTILLER.TEACHER = CN(node)
    c.DISTILLER.STUDENT = CN(dict(node, BACKBONE_NAME="resnet18"))
    return c


def default_cfg():
    try:
        from configs import get_default_cfg
    except ImportError:
        return _local_default_cfg()
    return get_default_cfg()


def make_cfg(backbone="resnet18_x05", frozen_bn=False, freeze=True, lut=10, cq=8, **solver):
    """A small configuration: 64x96 images, few proposals and RoIs, tiny OIM tables."""
    cfg = default_cfg()
    cfg.defrost()
    cfg.INPUT.MIN_SIZE = 64
    cfg.INPUT.MAX_SIZE = 96
    cfg.MODEL.ANCHOR_SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.ANCHOR_ASPECT_RATIOS = [[0.5, 1.0, 2.0]] * 5
    rpn = cfg.MODEL.RPN
    rpn.PRE_NMS_TOPN_TRAIN, rpn.PRE_NMS_TOPN_TEST = 300, 300
    rpn.POST_NMS_TOPN_TRAIN, rpn.POST_NMS_TOPN_TEST = 64, 64
    rpn.BATCH_SIZE_TRAIN = 64
    roi = cfg.MODEL.ROI_HEAD
    roi.BATCH_SIZE_TRAIN, roi.POS_FRAC_TRAIN = 32, 0.25
    roi.SCORE_THRESH_TEST, roi.NMS_THRESH_TEST, roi.DETECTIONS_PER_IMAGE_TEST = 0.0, 0.5, 20
    cfg.MODEL.LOSS.LUT_SIZE, cfg.MODEL.LOSS.CQ_SIZE = lut, cq
    for k, v in solver.items():
        cfg.SOLVER[k] = v
    for node in (cfg.BASELINE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT):
        node.BACKBONE_NAME = backbone
        node.BACKBONE_PRETRAIN = False
        node.BACKBONE_WEIGHTS = ""
        node.FROZENBN2d = frozen_bn
        node.FREEZE = freeze
    return cfg


def make_batch():
    """Two small images (64x96, kept as they are by the transform, and 80x60, resized to 85x64)
    with labeled and unlabeled people."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 80, 60, generator=g)]
    targets = [
        {"boxes": torch.tensor([[8.0, 6.0, 36.0, 56.0], [44.0, 14.0, 76.0, 60.0]]),
         "labels": torch.tensor([1, UNLABELED_PID])},
        {"boxes": torch.tensor([[4.0, 4.0, 28.0, 70.0], [30.0, 20.0, 56.0, 76.0]]),
         "labels": torch.tensor([3, 2])},
    ]
    return images, targets


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------- sizes
# SPEC 4.2. The FROZENBN2d setting behind each row: resnet50 False (trainable BN: its BN
# parameters are counted), resnet18 True (its base config: FrozenBatchNorm2d, BN parameters are
# buffers and not counted), resnet18_x05 False (its base config), mobilenet_v2: plain trainable
# BatchNorm2d always (FROZENBN2d does not apply to it).
PARAM_TABLE = [
    ("resnet50", False, 56_993_651, 23_508_032, 3_344_384, 593_935, 29_547_300),
    ("resnet18", True, 43_915_251, 11_166_912, 2_607_104, 593_935, 29_547_300),
    ("resnet18_x05", False, 35_424_339, 2_798_880, 2_484_224, 593_935, 29_547_300),
    ("mobilenet_v2", False, 34_435_123, 1_811_712, 2_482_176, 593_935, 29_547_300),
]


@pytest.mark.parametrize("name,frozen_bn,total,body,fpn,rpn,roi", PARAM_TABLE)
def test_parameter_counts(name, frozen_bn, total, body, fpn, rpn, roi):
    cfg = make_cfg(name, frozen_bn=frozen_bn, lut=5532, cq=5000)
    model = models.build_model(cfg)
    assert n_params(model.backbone.body) == body
    assert n_params(model.backbone.fpn) == fpn
    assert n_params(model.rpn) == rpn
    assert n_params(model.roi_heads) == roi
    assert n_params(model) == total
    # OIM tables are buffers
    assert model.roi_heads.reid_loss.lut.shape == (5532, 256)
    assert model.roi_heads.reid_loss.cq.shape == (5000, 256)


def test_frozen_bn_setting_changes_only_bn_parameters():
    # resnet18 with trainable BN has 2 x 4800 more parameters (its BN affine weights)
    m_bn = models.build_model(make_cfg("resnet18", frozen_bn=False))
    assert n_params(m_bn.backbone.body) == 11_166_912 + 9_600
    # mobilenet_v2 ignores FROZENBN2d
    m_mb = models.build_model(make_cfg("mobilenet_v2", frozen_bn=True))
    assert n_params(m_mb.backbone.body) == 1_811_712
    assert not any(isinstance(m, torchvision.ops.misc.FrozenBatchNorm2d)
                   for m in m_mb.modules())


def test_state_dict_names_follow_the_original():
    model = models.build_model(make_cfg("resnet18_x05"))
    sd = model.state_dict()
    allowed = ("backbone.body.", "backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.",
               "rpn.head.conv.", "rpn.head.cls_logits.", "rpn.head.bbox_pred.",
               "roi_heads.box_head.fc6.", "roi_heads.box_head.fc7.",
               "roi_heads.faster_rcnn_predictor.cls_score.",
               "roi_heads.faster_rcnn_predictor.bbox_pred.",
               "roi_heads.box_predictor.bbox_pred.0.", "roi_heads.box_predictor.bbox_pred.1.",
               "roi_heads.reid_head.fc6.", "roi_heads.reid_head.fc7.",
               "roi_heads.embedding_head.projectors.feat_beFC.0.",
               "roi_heads.embedding_head.projectors.feat_beFC.1.",
               "roi_heads.embedding_head.projectors.feat_afFC.0.",
               "roi_heads.embedding_head.projectors.feat_afFC.1.",
               "roi_heads.embedding_head.rescaler.", "roi_heads.reid_loss.")
    assert [k for k in sd if not k.startswith(allowed)] == []
    shapes = {
        "backbone.fpn.inner_blocks.0.0.weight": (256, 32, 1, 1),
        "backbone.fpn.layer_blocks.3.0.weight": (256, 256, 3, 3),
        "rpn.head.conv.0.0.weight": (256, 256, 3, 3),
        "rpn.head.cls_logits.weight": (3, 256, 1, 1),
        "rpn.head.bbox_pred.weight": (12, 256, 1, 1),
        "roi_heads.box_head.fc6.weight": (1024, 12544),
        "roi_heads.reid_head.fc7.weight": (1024, 1024),
        "roi_heads.faster_rcnn_predictor.cls_score.weight": (2, 1024),
        "roi_heads.faster_rcnn_predictor.bbox_pred.weight": (8, 1024),
        "roi_heads.box_predictor.bbox_pred.0.weight": (8, 1024),
        "roi_heads.box_predictor.bbox_pred.1.running_mean": (8,),
        "roi_heads.embedding_head.projectors.feat_beFC.0.weight": (128, 12544),
        "roi_heads.embedding_head.projectors.feat_afFC.0.weight": (128, 1024),
        "roi_heads.embedding_head.projectors.feat_afFC.1.running_var": (128,),
        "roi_heads.embedding_head.rescaler.weight": (1,),
        "roi_heads.reid_loss.lut": (10, 256),
        "roi_heads.reid_loss.cq": (8, 256),
        "roi_heads.reid_loss.header_cq": (),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert sd["roi_heads.reid_loss.header_cq"].dtype == torch.int64


def test_resnet18_x05_names_are_torchvision_resnet18_names_at_half_width():
    model = models.build_model(make_cfg("resnet18_x05"))
    body = {k[len("backbone.body."):]: v for k, v in model.state_dict().items()
            if k.startswith("backbone.body.")}
    tv = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
          if not k.startswith("fc.")}
    assert set(body) == set(tv)
    for k, v in tv.items():
        if v.ndim == 4:  # conv: out and in channels halved (input image channels stay 3)
            expected = (v.shape[0] // 2, v.shape[1] if v.shape[1] == 3 else v.shape[1] // 2)
            assert tuple(body[k].shape[:2]) == expected, k
        elif v.ndim == 1:
            assert body[k].shape[0] == v.shape[0] // 2, k


def test_mobilenet_names_are_the_features_indices():
    model = models.build_model(make_cfg("mobilenet_v2"))
    body = {k[len("backbone.body."):]: v.shape for k, v in model.state_dict().items()
            if k.startswith("backbone.body.")}
    tv = {k[len("features."):]: v.shape
          for k, v in torchvision.models.mobilenet_v2().state_dict().items()
          if k.startswith("features.") and int(k.split(".")[1]) <= 17}
    assert body == tv
    assert "0.0.weight" in body and "17.conv.2.weight" in body
    feats = model.extract_features(torch.zeros(1, 3, 64, 96))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 24), (8, 12), (4, 6), (2, 3),
                                                              (1, 2)]


def test_anchor_settings_forms():
    sizes, ratios = _anchor_settings([[32], [64], [128], [256], [512]], [[0.5, 1.0, 2.0]] * 5)
    assert sizes == ((32,), (64,), (128,), (256,), (512,))
    assert ratios == ((0.5, 1.0, 2.0),) * 5
    assert _anchor_settings(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)) == (sizes, ratios)
    assert _anchor_settings([32, 64, 128, 256, 512], [0.5, 1.0, 2.0]) == (sizes, ratios)
    with pytest.raises(ValueError, match="ANCHOR_SIZES"):
        _anchor_settings([[32], [64]], [[1.0]])


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name,frozen_bn", [("resnet50", False), ("resnet18", True),
                                            ("resnet18_x05", False), ("mobilenet_v2", False)])
def test_forward_backward(name, frozen_bn):
    torch.manual_seed(0)
    model = models.build_model(make_cfg(name, frozen_bn=frozen_bn, freeze=True))
    model.train()
    # all-zero OIM tables (the initial state) give the re-id head zero gradients: fill them
    oim = model.roi_heads.reid_loss
    oim.lut.copy_(torch.nn.functional.normalize(torch.randn_like(oim.lut), dim=1))
    images, targets = make_batch()
    losses = model(images, targets)
    assert set(losses) == set(LOSS_KEYS)
    for k, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    sum(losses.values()).backward()

    params = dict(model.named_parameters())
    def has_grad(key):
        g = params[key].grad
        return g is not None and bool(g.abs().sum() > 0)

    if name == "mobilenet_v2":
        assert has_grad("backbone.body.0.0.weight")
        assert has_grad("backbone.body.3.conv.0.0.weight")
    else:
        # FREEZE: conv1 / bn1 take no gradient
        assert params["backbone.body.conv1.weight"].requires_grad is False
        assert params["backbone.body.conv1.weight"].grad is None
        if not frozen_bn:
            assert params["backbone.body.bn1.weight"].grad is None
        assert has_grad("backbone.body.layer1.0.conv1.weight")
        assert has_grad("backbone.body.layer4.0.conv1.weight")
    for key in ("backbone.fpn.inner_blocks.0.0.weight", "rpn.head.conv.0.0.weight",
                "rpn.head.cls_logits.weight", "roi_heads.box_head.fc6.weight",
                "roi_heads.faster_rcnn_predictor.cls_score.weight",
                "roi_heads.faster_rcnn_predictor.bbox_pred.weight",
                "roi_heads.reid_head.fc6.weight",
                "roi_heads.embedding_head.projectors.feat_beFC.0.weight",
                "roi_heads.embedding_head.projectors.feat_afFC.0.weight"):
        assert has_grad(key), key
    # the original's second-stage box_predictor is unused
    assert params["roi_heads.box_predictor.bbox_pred.0.weight"].grad is None


def test_loss_weights_are_applied():
    torch.manual_seed(0)
    cfg = make_cfg("resnet18_x05", LW_RPN_REG=2.0, LW_RPN_CLS=3.0, LW_PROPOSAL_REG=0.0,
                   LW_PROPOSAL_CLS=0.5, LW_BOX_REID=4.0)
    model = models.build_model(cfg)
    model.train()
    assert model.loss_weights == {"loss_rpn_reg": 2.0, "loss_rpn_cls": 3.0,
                                  "loss_proposal_reg": 0.0, "loss_proposal_cls": 0.5,
                                  "loss_box_reid": 4.0}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = make_batch()
    torch.manual_seed(1)
    weighted = model(images, targets)
    model.load_state_dict(state)  # undo the OIM update and BN statistics
    model.loss_weights = {k: 1.0 for k in LOSS_KEYS}
    torch.manual_seed(1)
    raw = model(images, targets)
    assert weighted["loss_proposal_reg"].item() == 0.0
    assert raw["loss_proposal_reg"].item() > 0.0
    for k, w in [("loss_rpn_reg", 2.0), ("loss_rpn_cls", 3.0), ("loss_proposal_cls", 0.5),
                 ("loss_box_reid", 4.0)]:
        assert torch.allclose(weighted[k], raw[k] * w, rtol=1e-4, atol=1e-6), k


def test_train_record_and_teacher_api():
    torch.manual_seed(0)
    model = models.build_model(make_cfg("resnet18", frozen_bn=True))
    model.train()
    images, targets = make_batch()
    losses, rec = model.forward_train(images, targets)
    assert isinstance(rec, TrainRecord) and set(losses) == set(LOSS_KEYS)
    b = len(images)
    assert rec.images.tensors.shape[0] == b and rec.images.tensors.shape[-1] % 32 == 0
    assert len(rec.images.image_sizes) == b
    assert list(rec.features) == ["0", "1", "2", "3", "pool"]
    assert all(f.shape[1] == 256 for f in rec.features.values())
    # targets rescaled by the transform (image 2 is 80x60 -> shorter side 64: 85x64)
    assert tuple(rec.images.image_sizes[1]) == (85, 64)
    scale = torch.tensor([64 / 60, 85 / 80, 64 / 60, 85 / 80])
    assert torch.allclose(rec.targets[1]["boxes"], targets[1]["boxes"] * scale, atol=1e-3)
    assert len(rec.proposals) == len(rec.proposal_labels) == b
    assert sum(len(p) for p in rec.proposals) == rec.proposal_logits.shape[0]
    assert [len(p) for p in rec.proposals] == [len(l) for l in rec.proposal_labels]
    assert rec.proposal_logits.shape[1] == 2
    assert all(set(l.unique().tolist()) <= {0, 1} for l in rec.proposal_labels)
    assert all(len(p) <= 32 for p in rec.proposals)
    assert len(rec.reid_boxes) == len(rec.reid_labels) == b
    assert sum(len(x) for x in rec.reid_boxes) == rec.embeddings.shape[0]
    assert [len(x) for x in rec.reid_boxes] == [len(l) for l in rec.reid_labels]
    assert rec.embeddings.shape[1] == 256
    assert torch.allclose(rec.embeddings.norm(dim=1), torch.ones(len(rec.embeddings)), atol=1e-4)
    for labels, tgt in zip(rec.reid_labels, targets):
        assert labels.dtype == torch.int64
        assert set(labels.tolist()) <= {0} | set(tgt["labels"].tolist())
    # the appended gt boxes make every gt label appear in both stages
    assert {1, UNLABELED_PID} <= set(rec.reid_labels[0].tolist())
    assert rec.proposal_labels[0].sum() > 0

    # teacher-side API on the transformed batch reproduces the record (FrozenBN backbone; the
    # embedding head's BatchNorm1d sees the same batch, still in training mode)
    with torch.no_grad():
        feats = model.extract_features(rec.images.tensors)
        for k in rec.features:
            assert torch.allclose(feats[k], rec.features[k], atol=1e-5)
        logits = model.roi_heads.proposal_logits(feats, rec.proposals, rec.images.image_sizes)
        assert torch.allclose(logits, rec.proposal_logits, atol=1e-4)
        emb = model.roi_heads.box_embeddings(feats, rec.reid_boxes, rec.images.image_sizes)
        assert torch.allclose(emb, rec.embeddings, atol=1e-4)
        oim_logits = model.roi_heads.reid_loss.logits(emb)
        assert oim_logits.shape == (emb.shape[0], 10 + 8)


def test_training_with_an_image_without_people():
    torch.manual_seed(0)
    model = models.build_model(make_cfg("resnet18_x05")).train()
    images, targets = make_batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses, rec = model.forward_train(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert rec.proposal_labels[1].sum() == 0 and rec.reid_labels[1].sum() == 0
    sum(losses.values()).backward()


def test_training_under_bf16_autocast_keeps_boxes_in_float32():
    torch.manual_seed(0)
    model = models.build_model(make_cfg("resnet18_x05")).train()
    images, targets = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, rec = model.forward_train(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert rec.proposals[0].dtype == rec.reid_boxes[0].dtype == torch.float32
    assert rec.proposal_logits.dtype == rec.embeddings.dtype == torch.float32
    sum(losses.values()).backward()


def test_forward_train_requires_training_mode():
    model = models.build_model(make_cfg("resnet18_x05")).eval()
    with pytest.raises(RuntimeError, match="training mode"):
        model.forward_train(*make_batch())


def test_build_model_roles():
    cfg = make_cfg("resnet18_x05")
    cfg.DISTILLER.TEACHER.BACKBONE_NAME = "resnet18"
    cfg.DISTILLER.STUDENT.BACKBONE_NAME = "mobilenet_v2"
    assert "layer1.0.conv1.weight" in dict(
        models.build_model(cfg, "baseline").backbone.body.named_parameters())
    assert n_params(models.build_model(cfg, "teacher").backbone.fpn) == 2_607_104
    assert n_params(models.build_model(cfg, "student").backbone.fpn) == 2_482_176
    with pytest.raises(ValueError, match="role"):
        models.build_model(cfg, "assistant")


# ---------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def trained_model():
    """A resnet18_x05 model after one training step (so the BN statistics are sane), eval mode."""
    torch.manual_seed(0)
    model = models.build_model(make_cfg("resnet18_x05"))
    model.train()
    images, targets = make_batch()
    model(images, targets)
    return model.eval()


def test_inference_outputs(trained_model):
    images, _ = make_batch()
    with torch.no_grad():
        out = trained_model(images)
    assert len(out) == 2
    for det, img in zip(out, images):
        n = det["boxes"].shape[0]
        assert n > 0 and n <= 20
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,)
        assert det["embeddings"].shape == (n, 256)
        h, w = img.shape[-2:]
        assert det["boxes"][:, 0::2].min() >= 0 and det["boxes"][:, 0::2].max() <= w + 1e-3
        assert det["boxes"][:, 1::2].min() >= 0 and det["boxes"][:, 1::2].max() <= h + 1e-3
        # CWS: embeddings = unit vectors * first-stage score
        assert torch.allclose(det["embeddings"].norm(dim=1), det["scores"], atol=1e-4)
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        # after the second NMS at 0.5 no two boxes overlap more than that
        iou = box_ops.box_iou(det["boxes"], det["boxes"]).fill_diagonal_(0)
        assert iou.max() <= 0.5 + 1e-4


def test_inference_without_detections(trained_model):
    images, _ = make_batch()
    trained_model.roi_heads.score_thresh = 1.0  # softmax never exceeds it
    try:
        with torch.no_grad():
            out = trained_model(images)
            qg = trained_model(images[:1], [{"boxes": torch.tensor([[8.0, 6.0, 36.0, 56.0]])}],
                               query_img_as_gallery=True)[0]
    finally:
        trained_model.roi_heads.score_thresh = 0.0
    for det in out:
        assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,)
        assert det["embeddings"].shape == (0, 256)
    assert qg["boxes"].tolist() == [[8.0, 6.0, 36.0, 56.0]] and qg["scores"].tolist() == [1.0]


def test_query_mode(trained_model):
    images, targets = make_batch()
    with torch.no_grad():
        q = trained_model(images, targets)
    assert isinstance(q, list) and [t.shape for t in q] == [(2, 256), (2, 256)]
    for e in q:
        assert torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-4)
    # one box gives 1 x 256, the same as with other boxes of the same image (batches are
    # padded to a common size, which changes features near the borders: compare per image)
    with torch.no_grad():
        q_two = trained_model(images[1:], targets[1:])
        q_one = trained_model(images[1:], [{"boxes": targets[1]["boxes"][:1],
                                            "labels": targets[1]["labels"][:1]}])
    assert q_one[0].shape == (1, 256)
    assert torch.allclose(q_one[0][0], q_two[0][0], atol=1e-5)


def test_query_image_as_gallery(trained_model):
    images, targets = make_batch()
    img, box = images[0], targets[0]["boxes"][:1]
    query = [{"boxes": box, "labels": torch.tensor([1])}]
    with torch.no_grad():
        out = trained_model([img], query, query_img_as_gallery=True)[0]
        gallery = trained_model([img])[0]
        q_emb = trained_model([img], query)[0]
    assert torch.equal(out["boxes"][0], box[0])
    assert out["scores"][0].item() == 1.0
    assert torch.allclose(out["embeddings"][0], q_emb[0], atol=1e-5)  # no CWS
    rest = out["boxes"][1:]
    assert len(rest) >= 1
    # no confidence weighting for ANY box of the query image: unit embeddings, unlike the same
    # image seen as a gallery (CWS: norm = score)
    assert torch.allclose(out["embeddings"].norm(dim=1), torch.ones(len(out["boxes"])), atol=1e-4)
    assert (out["scores"][1:] < 0.999).any(), "the test needs detections whose CWS would show"
    assert torch.allclose(gallery["embeddings"].norm(dim=1), gallery["scores"], atol=1e-4)
    # the others are what the second NMS (0.5) keeps when the query box takes part in it with
    # the top score, as in the original (so the query's own duplicate detection goes away)
    with torch.no_grad():
        images_t, _ = trained_model.transform([img])  # 64 x 96: the scale is 1
        feats = trained_model.backbone(images_t.tensors)
        proposals, _ = trained_model.rpn(images_t, feats)
        boxes, scores = trained_model.roi_heads.detect(feats, proposals, images_t.image_sizes)
    all_boxes = torch.cat([box, boxes[0]])
    keep = box_ops.nms(all_boxes, torch.cat([torch.tensor([2.0]), scores[0]]), 0.5)
    keep = keep[: trained_model.roi_heads.detections_per_img]  # the query box counts in the cut
    assert keep[0] == 0
    assert torch.allclose(rest, all_boxes[keep[1:]], atol=1e-4)
    assert torch.allclose(out["scores"][1:], scores[0][keep[1:] - 1])
    assert (box_ops.box_iou(box, rest) <= 0.5 + 1e-5).all()
    # the plain embeddings of the same boxes (RoIAlign -> reid_head -> embedding_head)
    with torch.no_grad():
        plain = trained_model.roi_heads.box_embeddings(feats, [rest], images_t.image_sizes)
    assert torch.allclose(out["embeddings"][1:], plain, atol=1e-5)


def test_query_image_as_gallery_keeps_detections_per_image(trained_model):
    """The query box (score 1) joins the detections BEFORE the final NMS and the
    top-DETECTIONS_PER_IMAGE_TEST cut, so it counts in that cut (the original's order)."""
    images, targets = make_batch()
    img, box = images[0], targets[0]["boxes"][:1]
    query = [{"boxes": box, "labels": torch.tensor([1])}]
    roi_heads = trained_model.roi_heads
    limit = roi_heads.detections_per_img
    roi_heads.detections_per_img = 3
    try:
        with torch.no_grad():
            out = trained_model([img], query, query_img_as_gallery=True)[0]
            images_t, _ = trained_model.transform([img])  # 64 x 96: the scale is 1
            feats = trained_model.backbone(images_t.tensors)
            proposals, _ = trained_model.rpn(images_t, feats)
            boxes, scores = roi_heads.detect(feats, proposals, images_t.image_sizes)
    finally:
        roi_heads.detections_per_img = limit
    all_boxes = torch.cat([box, boxes[0]])
    keep = box_ops.nms(all_boxes, torch.cat([torch.tensor([2.0]), scores[0]]), 0.5)
    assert len(keep) > 3, "the test needs more than 3 boxes left after the final NMS"
    assert len(out["boxes"]) == 3  # the query box and the 2 best others, not 1 + 3
    assert torch.equal(out["boxes"][0], box[0]) and out["scores"][0].item() == 1.0
    assert torch.allclose(out["boxes"], all_boxes[keep[:3]], atol=1e-4)


# ---------------------------------------------------------------------------------- OIM
def test_oim_hand_computed_logits_and_loss():
    oim = OIMLoss(num_features=2, lut_size=2, cq_size=1, momentum=0.5, scalar=2.0)
    oim.lut.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    oim.cq.copy_(torch.tensor([[0.6, 0.8]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([1, 0, UNLABELED_PID, 2])  # bg and unlabeled add no loss term
    assert torch.allclose(oim.logits(x[:1]), torch.tensor([[2.0, 0.0, 1.2]]))
    loss = oim.loss(x, labels)
    l1 = -(2.0 - math.log(math.exp(2.0) + math.exp(0.0) + math.exp(1.2)))
    l2 = -(0.0 - math.log(math.exp(2.0) + math.exp(0.0) + math.exp(1.2)))
    assert loss.item() == pytest.approx((l1 + l2) / 2, rel=1e-5)
    loss.backward()
    assert x.grad[1].abs().sum() == 0 and x.grad[2].abs().sum() == 0
    assert x.grad[0].abs().sum() > 0


def _reference_update(lut, cq, head, x, labels, m):
    """The original's sequential loop."""
    lut, cq = lut.clone(), cq.clone()
    for xi, yi in zip(x, labels.tolist()):
        if yi <= 0:
            continue
        if yi != UNLABELED_PID:
            row = m * lut[yi - 1] + (1 - m) * xi
            lut[yi - 1] = row / row.norm()
        else:
            cq[head] = xi
            head = (head + 1) % cq.shape[0]
    return lut, cq, head


def test_oim_update_matches_sequential_loop():
    g = torch.Generator().manual_seed(0)
    oim = OIMLoss(num_features=8, lut_size=5, cq_size=4, momentum=0.5)
    oim.train()
    lut = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    oim.lut.copy_(lut)
    oim.header_cq.fill_(2)
    ref_lut, ref_cq, ref_head = lut, oim.cq.clone(), 2
    batches = [
        # duplicates of 3 (x3) and 1 (x2), background, 6 unlabeled (> CQ_SIZE, wraps)
        torch.tensor([3, 1, UNLABELED_PID, 3, 0, UNLABELED_PID, 2, UNLABELED_PID, 3, 1,
                      UNLABELED_PID, 5, UNLABELED_PID, UNLABELED_PID]),
        torch.tensor([UNLABELED_PID, 2, 2, 0, UNLABELED_PID, 4]),
        torch.tensor([0, 0]),
    ]
    for labels in batches:
        x = torch.nn.functional.normalize(torch.randn(len(labels), 8, generator=g), dim=1)
        ref_lut, ref_cq, ref_head = _reference_update(ref_lut, ref_cq, ref_head, x, labels, 0.5)
        oim(x.clone().requires_grad_(True), labels)  # loss, then update
        assert torch.allclose(oim.lut, ref_lut, atol=1e-6)
        assert torch.allclose(oim.cq, ref_cq, atol=1e-6)
        assert int(oim.header_cq) == ref_head
    # update() alone (as distributed training calls it) does the same thing
    x = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    labels = torch.tensor([4, 4, UNLABELED_PID, 4, UNLABELED_PID])
    ref_lut, ref_cq, ref_head = _reference_update(ref_lut, ref_cq, ref_head, x, labels, 0.5)
    oim.update(x, labels)
    assert torch.allclose(oim.lut, ref_lut, atol=1e-6)
    assert torch.allclose(oim.cq, ref_cq, atol=1e-6) and int(oim.header_cq) == ref_head


def test_oim_state_and_errors():
    oim = OIMLoss(num_features=4, lut_size=3, cq_size=2)
    sd = oim.state_dict()
    assert set(sd) == {"lut", "cq", "header_cq"}
    assert sd["header_cq"].dtype == torch.int64 and sd["header_cq"].ndim == 0
    with pytest.raises(ValueError, match="LUT_SIZE"):
        oim(torch.randn(2, 4), torch.tensor([1, 4]))
    # no labeled foreground: a zero loss that still backpropagates
    x = torch.randn(3, 4, requires_grad=True)
    loss = oim(x, torch.tensor([0, UNLABELED_PID, 0]))
    assert loss.item() == 0.0
    loss.backward()
    # in eval mode the tables are not updated
    oim.eval()
    before = oim.cq.clone()
    oim(torch.randn(1, 4), torch.tensor([UNLABELED_PID]))
    assert torch.equal(before, oim.cq)


def test_oim_float32_under_autocast():
    oim = OIMLoss(num_features=4, lut_size=3, cq_size=2).train()
    x = torch.nn.functional.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = oim(x.to(torch.bfloat16), torch.tensor([1, 2, UNLABELED_PID]))
        logits = oim.logits(x.to(torch.bfloat16))
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    assert oim.lut.dtype == torch.float32 and oim.lut[:2].norm(dim=1).allclose(torch.ones(2),
                                                                                 atol=1e-2)


# ---------------------------------------------------------------------------------- weights
def _fake_hub(monkeypatch, tmp_path):
    """Point the torch hub cache at an empty directory and make downloading fail loudly."""
    calls = []

    def no_download(weights):
        calls.append(weights)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(backbones_mod, "_download_state_dict", no_download)
    return calls


def test_pretrained_offline_gives_clear_error(monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, tmp_path)
    cfg = make_cfg("resnet18", frozen_bn=True)
    cfg.DISTILLER.STUDENT.BACKBONE_PRETRAIN = True
    with pytest.raises(RuntimeError) as err:
        models.build_model(cfg, "student")
    msg = str(err.value)
    assert "resnet18" in msg and "DISTILLER.STUDENT.BACKBONE_WEIGHTS" in msg
    assert len(calls) == 1


def test_pretrained_from_hub_cache(monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, tmp_path)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    ckpt_dir = tmp_path / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.manual_seed(3)
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), ckpt_dir / os.path.basename(weights.url))
    cfg = make_cfg("resnet18", frozen_bn=True)
    cfg.BASELINE.BACKBONE_PRETRAIN = True
    model = models.build_model(cfg)
    assert calls == []
    sd = model.backbone.body.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(sd[k], v), k


def test_local_weights_file(monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, tmp_path)
    torch.manual_seed(4)
    ref = torchvision.models.mobilenet_v2()
    path = tmp_path / "mbv2.pth"
    torch.save(ref.state_dict(), path)
    cfg = make_cfg("mobilenet_v2")
    cfg.BASELINE.BACKBONE_PRETRAIN = True
    cfg.BASELINE.BACKBONE_WEIGHTS = str(path)
    model = models.build_model(cfg)
    assert calls == []
    body = model.backbone.body.state_dict()
    for k, v in ref.state_dict().items():
        if k.startswith("features.") and int(k.split(".")[1]) <= 17:
            assert torch.equal(body[k[len("features."):]], v), k

    # a file that does not fit the trunk is an error listing the keys
    bad = {k: v for k, v in ref.state_dict().items() if not k.startswith("features.5.")}
    torch.save(bad, tmp_path / "bad.pth")
    cfg.BASELINE.BACKBONE_WEIGHTS = str(tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match=r"features\.5\."):
        models.build_model(cfg)
    cfg.BASELINE.BACKBONE_WEIGHTS = str(tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="BASELINE.BACKBONE_WEIGHTS"):
        models.build_model(cfg)


def test_resnet18_x05_pretrained_needs_a_local_file(monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, tmp_path)
    cfg = make_cfg("resnet18_x05")
    cfg.BASELINE.BACKBONE_PRETRAIN = True
    with pytest.raises(RuntimeError, match="resnet18_x05.*BASELINE.BACKBONE_WEIGHTS"):
        models.build_model(cfg)
    torch.manual_seed(5)
    ref = HalfWidthResNet18()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "x05.pth")
    cfg.BASELINE.BACKBONE_WEIGHTS = str(tmp_path / "x05.pth")
    model = models.build_model(cfg)
    assert torch.equal(model.backbone.body.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    assert calls == []


def test_nae_projections_start_as_seqnet_initialises_them():
    """SeqNet initialises both the Linear and the BatchNorm1d of each NAE projection (and of the
    unused box predictor) with weights N(0, 0.01) and zero biases: the BatchNorm's scale starts
    near 0, not at torch's default 1, which sets the initial embedding geometry."""
    torch.manual_seed(0)
    model = models.build_model(make_cfg("resnet18_x05"))
    heads = model.roi_heads
    seqs = list(heads.embedding_head.projectors.values()) + [heads.box_predictor.bbox_pred]
    for seq in seqs:
        for layer in seq:
            w = layer.weight.detach()
            assert abs(float(w.mean())) < 0.01 and 0.005 < float(w.std()) < 0.02, layer
            assert torch.count_nonzero(layer.bias) == 0
    assert float(heads.embedding_head.rescaler.weight.detach()) == 1.0  # the rescaler keeps torch's default
