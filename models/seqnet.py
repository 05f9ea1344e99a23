"""SeqNet with FPN (the original's "SeqNet_D", SPEC 4): model, RoI heads and heads.

Training: ``model(images, targets)`` -> weighted losses; ``model.forward_train`` also returns a
``TrainRecord`` with what distillation needs (SPEC 6). Inference: ``model(images)`` -> detections,
``model(images, targets)`` -> query embeddings, ``model(images, targets,
query_img_as_gallery=True)`` -> detections with the query box first. Teacher-side helpers work on
an already-transformed batch: ``extract_features``, ``roi_heads.proposal_logits``,
``roi_heads.box_embeddings``, ``roi_heads.reid_loss.logits``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops

from .backbones import FPN_OUT_CHANNELS, build_backbone
from .oim import OIMLoss

__all__ = [
    "BoxHead",
    "BBoxRegressor",
    "NormAwareEmbedding",
    "SeqNetFPN",
    "SeqRoIHeads",
    "TrainRecord",
    "build_seqnet",
]

IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]
ROI_OUTPUT_SIZE = 7
REPRESENTATION_SIZE = 1024
EMBEDDING_DIM = 256
SECOND_NMS_THRESH = 0.5
MIN_BOX_SIZE = 1e-2
LOSS_KEYS = ("loss_rpn_reg", "loss_rpn_cls", "loss_proposal_reg", "loss_proposal_cls",
             "loss_box_reid")


@dataclass
class TrainRecord:
    """What one training forward keeps for distillation (SPEC 6, step 1). Coordinates are those of
    the transformed (resized, padded) batch ``images``."""
    images: ImageList                  # .tensors (B,3,H,W) normalised + padded; .image_sizes
    targets: List[Dict[str, Tensor]]   # transformed targets (boxes rescaled)
    features: "OrderedDict[str, Tensor]"  # FPN maps '0','1','2','3','pool'
    proposals: List[Tensor]            # per image: sampled first-stage proposals (n_i, 4)
    proposal_labels: List[Tensor]      # per image: their int64 0/1 labels (n_i,)
    proposal_logits: Tensor            # (sum n_i, 2), first-stage class logits, images in order
    reid_boxes: List[Tensor]           # per image: sampled second-stage boxes (m_i, 4)
    reid_labels: List[Tensor]          # per image: int64 pid labels (0 bg, 1..C, 5555)
    embeddings: Tensor                 # (sum m_i, 256), L2-normalised


class BoxHead(nn.Module):
    """fc6 -> ReLU -> fc7 -> ReLU on the flattened RoI feature; returns (flattened input, output)."""

    def __init__(self, in_channels: int = FPN_OUT_CHANNELS * ROI_OUTPUT_SIZE ** 2,
                 representation_size: int = REPRESENTATION_SIZE):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        flat = x.flatten(start_dim=1)
        out = F.relu(self.fc6(flat))
        out = F.relu(self.fc7(out))
        return flat, out


def split_per_image(values: Tensor, per_image: Sequence[Tensor]) -> List[Tensor]:
    """``values`` (rows of all images, in order) cut into one tensor per image, by the lengths of
    ``per_image``. A single image takes all rows without a split: a traced export
    (tools/export.py) would otherwise freeze that image's number of boxes into the graph."""
    if len(per_image) == 1:
        return [values]
    return list(values.split([len(p) for p in per_image]))


def _init_linear_bn(seq: nn.Sequential) -> None:
    """SeqNet's initialisation of a Linear + BatchNorm1d pair: both weights N(0, 0.01), both
    biases 0 (the BatchNorm's scale starts near 0, not at torch's default 1)."""
    for layer in seq:
        nn.init.normal_(layer.weight, std=0.01)
        nn.init.zeros_(layer.bias)


class BBoxRegressor(nn.Module):
    """The original's second-stage ``box_predictor``: defined (so checkpoints load) but unused."""

    def __init__(self, in_channels: int = REPRESENTATION_SIZE, num_classes: int = 2):
        super().__init__()
        self.bbox_pred = nn.Sequential(nn.Linear(in_channels, 4 * num_classes),
                                       nn.BatchNorm1d(4 * num_classes))
        _init_linear_bn(self.bbox_pred)

    def forward(self, x: Tensor) -> Tensor:
        return self.bbox_pred(x.flatten(start_dim=1))


class NormAwareEmbedding(nn.Module):
    """NAE: Linear+BatchNorm1d projections of the flattened RoI feature (``feat_beFC``, 12544 ->
    128) and of the fc7 output (``feat_afFC``, 1024 -> 128), concatenated in that order and
    L2-normalised; the norm through the BatchNorm1d(1) ``rescaler`` is a person score.
    Initialised as SeqNet's: Linear and BatchNorm weights N(0, 0.01), biases 0."""

    def __init__(self, in_channels: Sequence[int] = (FPN_OUT_CHANNELS * ROI_OUTPUT_SIZE ** 2,
                                                     REPRESENTATION_SIZE),
                 featmap_names: Sequence[str] = ("feat_beFC", "feat_afFC"),
                 dim: int = EMBEDDING_DIM):
        super().__init__()
        n = len(featmap_names)
        dims = [dim // n] * n
        dims[-1] += dim - sum(dims)
        self.featmap_names = list(featmap_names)
        self.projectors = nn.ModuleDict()
        for name, c, d in zip(featmap_names, in_channels, dims):
            proj = nn.Sequential(nn.Linear(c, d), nn.BatchNorm1d(d))
            _init_linear_bn(proj)
            self.projectors[name] = proj
        self.rescaler = nn.BatchNorm1d(1, affine=True)

    def forward(self, feats: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        outs = [self.projectors[k](feats[k].flatten(start_dim=1)) for k in self.featmap_names]
        emb = torch.cat(outs, dim=1).float()
        norms = emb.norm(p=2, dim=1, keepdim=True)
        emb = emb / norms.clamp_min(1e-12)
        if self.training and norms.shape[0] < 2:  # BatchNorm cannot train on a single value
            scores = norms.squeeze(1)
        else:
            scores = self.rescaler(norms).squeeze(1)
        return emb, scores


class Float32RPNHead(RPNHead):
    """torchvision's RPNHead (same parameter names) whose outputs are float32 even under
    autocast, so that anchors are decoded in full precision."""

    def forward(self, x: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class SeqRoIHeads(nn.Module):
    """The two-stage heads of SeqNet-FPN (SPEC 4). ``box_roi_pool`` is shared by both stages."""

    def __init__(self, box_roi_pool: MultiScaleRoIAlign, box_head: BoxHead,
                 faster_rcnn_predictor: FastRCNNPredictor, reid_head: BoxHead,
                 embedding_head: NormAwareEmbedding, box_predictor: BBoxRegressor,
                 reid_loss: OIMLoss, *, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
                 second_nms_thresh: float = SECOND_NMS_THRESH):
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.faster_rcnn_predictor = faster_rcnn_predictor
        self.reid_head = reid_head
        self.embedding_head = embedding_head
        self.box_predictor = box_predictor
        self.reid_loss = reid_loss
        self.proposal_matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh,
                                                  allow_low_quality_matches=False)
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image,
                                                                       positive_fraction)
        self.box_coder = det_utils.BoxCoder(tuple(float(w) for w in bbox_reg_weights))
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.second_nms_thresh = float(second_nms_thresh)

    # ------------------------------------------------------------------ sampling
    def sample(self, boxes: List[Tensor], targets: List[Dict[str, Tensor]]
               ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Append the gt boxes to ``boxes``, match (Matcher with the RoI thresholds) and sample
        (BATCH_SIZE_TRAIN, POS_FRAC_TRAIN). Returns per image the sampled boxes, their matched
        labels (the gt label: pid 1..C / 5555; 0 background) and regression targets."""
        all_boxes, all_labels, all_gt = [], [], []
        for props, tgt in zip(boxes, targets):
            gt_boxes = tgt["boxes"].to(props.dtype)
            gt_labels = tgt["labels"].to(torch.int64)
            props = torch.cat([props.detach(), gt_boxes], dim=0)
            if gt_boxes.numel() == 0:  # no person: all background (zero regression targets)
                labels = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                matched_gt = props
            else:
                idx = self.proposal_matcher(box_ops.box_iou(gt_boxes, props))
                clamped = idx.clamp(min=0)
                labels = gt_labels[clamped]
                labels[idx == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
                labels[idx == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
                matched_gt = gt_boxes[clamped]
            all_boxes.append(props)
            all_labels.append(labels)
            all_gt.append(matched_gt)
        pos_masks, neg_masks = self.fg_bg_sampler(all_labels)
        out_boxes, out_labels, out_targets = [], [], []
        for props, labels, gt, pos, neg in zip(all_boxes, all_labels, all_gt, pos_masks,
                                               neg_masks):
            keep = torch.where(pos | neg)[0]
            out_boxes.append(props[keep])
            out_labels.append(labels[keep])
            out_targets.append(self.box_coder.encode_single(gt[keep], props[keep]))
        return out_boxes, out_labels, out_targets

    # ------------------------------------------------------------------ building blocks
    def _first_stage(self, features, proposals, image_sizes) -> Tuple[Tensor, Tensor]:
        roi = self.box_roi_pool(features, proposals, image_sizes)
        _, h = self.box_head(roi)
        logits, regression = self.faster_rcnn_predictor(h)
        # float32 under autocast: box decoding in half precision would move boxes by pixels
        return logits.float(), regression.float()

    def proposal_logits(self, features: Dict[str, Tensor], proposals: List[Tensor],
                        image_sizes: List[Tuple[int, int]]) -> Tensor:
        """First-stage class logits (N, 2) of the given boxes (RoIAlign -> box_head ->
        faster_rcnn_predictor), images concatenated in order."""
        return self._first_stage(features, proposals, image_sizes)[0]

    def box_embeddings(self, features: Dict[str, Tensor], boxes: List[Tensor],
                       image_sizes: List[Tuple[int, int]]) -> Tensor:
        """L2-normalised embeddings (N, 256) of the given boxes (RoIAlign -> reid_head ->
        embedding_head), images concatenated in order."""
        return self._embed(features, boxes, image_sizes)[0]

    def _embed(self, features, boxes, image_sizes) -> Tuple[Tensor, Tensor]:
        roi = self.box_roi_pool(features, boxes, image_sizes)
        flat, h = self.reid_head(roi)
        return self.embedding_head(OrderedDict([("feat_beFC", flat), ("feat_afFC", h)]))

    def _person_boxes(self, box_regression: Tensor, proposals: List[Tensor],
                      image_sizes) -> List[Tensor]:
        """Decoded person-class boxes (class 1), clipped to their image, per image."""
        pred = self.box_coder.decode(box_regression, proposals)[:, 1]
        out = []
        for boxes, size in zip(split_per_image(pred, proposals), image_sizes):
            out.append(box_ops.clip_boxes_to_image(boxes, size))
        return out

    # ------------------------------------------------------------------ training
    def forward_train(self, features, proposals, image_sizes, targets):
        proposals, labels, reg_targets = self.sample(proposals, targets)
        labels01 = [(lab > 0).to(torch.int64) for lab in labels]
        class_logits, box_regression = self._first_stage(features, proposals, image_sizes)
        loss_cls, loss_reg = self._detection_losses(class_logits, box_regression,
                                                    torch.cat(labels01), torch.cat(reg_targets))

        boxes = [b.detach() for b in self._person_boxes(box_regression.detach(), proposals,
                                                        image_sizes)]
        reid_boxes, reid_labels, _ = self.sample(boxes, targets)
        embeddings, _ = self._embed(features, reid_boxes, image_sizes)
        loss_reid = self.reid_loss(embeddings, torch.cat(reid_labels))
        losses = {"loss_proposal_cls": loss_cls, "loss_proposal_reg": loss_reg,
                  "loss_box_reid": loss_reid}
        record = dict(proposals=proposals, proposal_labels=labels01,
                      proposal_logits=class_logits, reid_boxes=reid_boxes,
                      reid_labels=reid_labels, embeddings=embeddings)
        return losses, record

    @staticmethod
    def _detection_losses(class_logits: Tensor, box_regression: Tensor, labels: Tensor,
                          reg_targets: Tensor) -> Tuple[Tensor, Tensor]:
        """Cross-entropy on the 0/1 labels; smooth L1 (beta 1) on the person-class regression of
        the positives, summed and divided by the number of sampled proposals."""
        loss_cls = F.cross_entropy(class_logits, labels)
        pos = torch.where(labels > 0)[0]
        reg = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, 1]
        loss_reg = F.smooth_l1_loss(reg, reg_targets[pos], beta=1.0, reduction="sum")
        return loss_cls, loss_reg / max(labels.numel(), 1)

    # ------------------------------------------------------------------ inference
    def detect(self, features, proposals, image_sizes) -> Tuple[List[Tensor], List[Tensor]]:
        """First stage post-processing: person score > SCORE_THRESH_TEST, small boxes removed,
        NMS NMS_THRESH_TEST, top DETECTIONS_PER_IMAGE_TEST. Returns per image boxes and scores."""
        class_logits, box_regression = self._first_stage(features, proposals, image_sizes)
        boxes_all = self._person_boxes(box_regression, proposals, image_sizes)
        scores_all = split_per_image(F.softmax(class_logits, dim=-1)[:, 1], proposals)
        out_boxes, out_scores = [], []
        for boxes, scores in zip(boxes_all, scores_all):
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores = boxes[keep], scores[keep]
            keep = box_ops.remove_small_boxes(boxes, MIN_BOX_SIZE)
            boxes, scores = boxes[keep], scores[keep]
            keep = box_ops.nms(boxes, scores, self.nms_thresh)[: self.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
        return out_boxes, out_scores

    def forward_inference(self, features, proposals, image_sizes,
                          query_boxes: Optional[List[Tensor]] = None) -> List[Dict[str, Tensor]]:
        """Gallery detections: boxes, first-stage scores and CWS embeddings (emb * score), after a
        second NMS at 0.5.

        With ``query_boxes`` (the query image seen as a gallery, for CBGM), exactly as the
        original: confidence weighting is off for every box of the image, and the query box
        (score 1, its embedding from RoIAlign on the given box) joins the detections before the
        final NMS, so it suppresses the detections overlapping it by IoU > 0.5; then the top
        DETECTIONS_PER_IMAGE_TEST are kept, the query box first. Having the highest score, the
        query box is kept by that NMS whatever else there is: it is put first explicitly (a
        detection whose score rounds to 1.0 must not outrank it), and NMS runs on the rest."""
        boxes, scores = self.detect(features, proposals, image_sizes)
        emb = self.box_embeddings(features, boxes, image_sizes)
        if query_boxes is None:
            emb = emb * torch.cat(scores)[:, None]  # CWS
        emb = split_per_image(emb, boxes)
        q_emb = None
        if query_boxes is not None:
            q_emb = split_per_image(self.box_embeddings(features, query_boxes, image_sizes), query_boxes)
        results = []
        for i, (b, s, e) in enumerate(zip(boxes, scores, emb)):
            n_query = len(query_boxes[i]) if query_boxes is not None else 0
            limit = self.detections_per_img
            if n_query:
                qb = query_boxes[i].to(b.dtype)
                overlap = box_ops.box_iou(qb, b).amax(dim=0) > self.second_nms_thresh
                keep = torch.where(~overlap)[0]
                b, s, e = b[keep], s[keep], e[keep]
                limit = max(limit - n_query, 0)
            keep = box_ops.nms(b, s, self.second_nms_thresh)[:limit]
            b, s, e = b[keep], s[keep], e[keep]
            if n_query:
                b = torch.cat([query_boxes[i].to(b.dtype), b])
                s = torch.cat([s.new_ones(n_query), s])
                e = torch.cat([q_emb[i], e])
            results.append({"boxes": b, "scores": s, "embeddings": e})
        return results

    def forward(self, features, proposals, image_sizes, targets=None,
                query_boxes: Optional[List[Tensor]] = None):
        """Training: ``(losses, record dict)`` (``forward_train``); inference: detections
        (``forward_inference``)."""
        if self.training:
            return self.forward_train(features, proposals, image_sizes, targets)
        return self.forward_inference(features, proposals, image_sizes, query_boxes)

    def query_embeddings(self, features, boxes: List[Tensor], image_sizes) -> List[Tensor]:
        """Embeddings (n_i, 256) of the given query boxes, per image (no detection, no CWS)."""
        emb = self.box_embeddings(features, boxes, image_sizes)
        return split_per_image(emb, boxes)


def _anchor_settings(sizes, ratios, num_levels: int = 5):
    """Normalise ANCHOR_SIZES / ANCHOR_ASPECT_RATIOS into per-level tuples. Accepted: one entry per
    level (``((32,), (64,), ...)``), a flat list of one size per level, or a single tuple holding
    one size per level; ratios as one tuple per level, or one tuple / flat list for all levels."""
    def is_seq(v):
        return isinstance(v, (list, tuple))

    sizes = list(sizes)
    if sizes and not any(is_seq(s) for s in sizes):
        sizes = [(s,) for s in sizes]
    elif len(sizes) == 1 and is_seq(sizes[0]) and len(sizes[0]) == num_levels:
        sizes = [(s,) for s in sizes[0]]
    sizes = tuple(tuple(int(x) for x in s) for s in sizes)
    ratios = list(ratios)
    if ratios and not any(is_seq(r) for r in ratios):
        ratios = [tuple(ratios)] * num_levels
    elif len(ratios) == 1:
        ratios = [tuple(ratios[0])] * num_levels
    ratios = tuple(tuple(float(x) for x in r) for r in ratios)
    if len(sizes) != num_levels or len(ratios) != num_levels:
        raise ValueError(f"anchors: need {num_levels} FPN levels of sizes and ratios, got sizes "
                         f"{sizes} and ratios {ratios} (MODEL.ANCHOR_SIZES / "
                         f"MODEL.ANCHOR_ASPECT_RATIOS)")
    counts = {len(s) * len(r) for s, r in zip(sizes, ratios)}
    if len(counts) != 1:
        raise ValueError(f"anchors: every level needs the same number of anchors, got sizes "
                         f"{sizes} and ratios {ratios}")
    return sizes, ratios


class SeqNetFPN(nn.Module):
    """SeqNet with FPN. Attributes: ``transform``, ``backbone`` (``body``, ``fpn``), ``rpn``,
    ``roi_heads``; ``loss_weights`` maps each loss key to its SOLVER.LW_* weight."""

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: SeqRoIHeads,
                 transform: GeneralizedRCNNTransform, loss_weights: Dict[str, float]):
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.loss_weights = {k: float(loss_weights.get(k, 1.0)) for k in LOSS_KEYS}

    # ------------------------------------------------------------------ helpers
    def extract_features(self, images_tensor: Tensor) -> "OrderedDict[str, Tensor]":
        """FPN maps ('0'..'3', 'pool') of an already transformed (normalised, padded) batch."""
        return self.backbone(images_tensor)

    @staticmethod
    def _check_targets(targets, n_images: int, need_labels: bool = True) -> None:
        if targets is None:
            raise ValueError("training needs targets")
        if len(targets) != n_images:
            raise ValueError(f"{n_images} images but {len(targets)} targets")
        for t in targets:
            boxes = t["boxes"]
            if boxes.ndim != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"target boxes must be (n, 4), got {tuple(boxes.shape)}")
            if need_labels and "labels" not in t:
                raise ValueError("training targets need 'labels'")

    # ------------------------------------------------------------------ training
    def forward_train(self, images: List[Tensor], targets: List[Dict[str, Tensor]]
                      ) -> Tuple[Dict[str, Tensor], TrainRecord]:
        """Weighted losses and the TrainRecord of this batch (model must be in training mode)."""
        if not self.training:
            raise RuntimeError("forward_train needs the model in training mode (model.train())")
        self._check_targets(targets, len(images))
        images_t, targets_t = self.transform(list(images), [dict(t) for t in targets])
        features = self.backbone(images_t.tensors)
        proposals, rpn_losses = self.rpn(images_t, features, targets_t)
        roi_losses, rec = self.roi_heads.forward_train(features, proposals,
                                                       images_t.image_sizes, targets_t)
        raw = {"loss_rpn_reg": rpn_losses["loss_rpn_box_reg"],
               "loss_rpn_cls": rpn_losses["loss_objectness"], **roi_losses}
        losses = {k: raw[k] * self.loss_weights[k] for k in LOSS_KEYS}
        record = TrainRecord(images=images_t, targets=targets_t, features=features, **rec)
        return losses, record

    # ------------------------------------------------------------------ entry point
    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None,
                query_img_as_gallery: bool = False):
        if self.training:
            return self.forward_train(images, targets)[0]
        images = list(images)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        if targets is not None:
            targets = [dict(t) for t in targets]
            self._check_targets(targets, len(images), need_labels=False)
        images_t, targets_t = self.transform(images, targets)
        features = self.backbone(images_t.tensors)
        if targets_t is not None and not query_img_as_gallery:
            boxes = [t["boxes"] for t in targets_t]
            return self.roi_heads.query_embeddings(features, boxes, images_t.image_sizes)
        if query_img_as_gallery and targets_t is None:
            raise ValueError("query_img_as_gallery needs targets holding the query box")
        proposals, _ = self.rpn(images_t, features)
        query_boxes = [t["boxes"] for t in targets_t] if query_img_as_gallery else None
        dets = self.roi_heads.forward_inference(features, proposals, images_t.image_sizes,
                                                query_boxes)
        dets = self.transform.postprocess(dets, images_t.image_sizes, original_sizes)
        if query_img_as_gallery:  # give back the query boxes exactly as they came in
            for det, tgt in zip(dets, targets):
                n = len(tgt["boxes"])
                if n:
                    det["boxes"][:n] = tgt["boxes"].to(det["boxes"])
        return dets


def build_seqnet(model_cfg, backbone_node, role_prefix: str = "BASELINE") -> SeqNetFPN:
    """Build from the full config ``model_cfg`` (MODEL, INPUT, SOLVER) and the role's backbone
    node (BASELINE, DISTILLER.TEACHER or DISTILLER.STUDENT)."""
    cfg = model_cfg
    weights_path = backbone_node.get("BACKBONE_WEIGHTS", "") or ""
    backbone = build_backbone(
        str(backbone_node.BACKBONE_NAME), pretrained=bool(backbone_node.BACKBONE_PRETRAIN),
        weights_path=str(weights_path), frozen_bn=bool(backbone_node.FROZENBN2d),
        freeze=bool(backbone_node.FREEZE), cfg_prefix=role_prefix)

    sizes, ratios = _anchor_settings(cfg.MODEL.ANCHOR_SIZES, cfg.MODEL.ANCHOR_ASPECT_RATIOS)
    anchor_generator = AnchorGenerator(sizes=sizes, aspect_ratios=ratios)
    rpn_cfg = cfg.MODEL.RPN
    rpn = RegionProposalNetwork(
        anchor_generator=anchor_generator,
        head=Float32RPNHead(backbone.out_channels,
                            anchor_generator.num_anchors_per_location()[0]),
        fg_iou_thresh=rpn_cfg.POS_THRESH_TRAIN, bg_iou_thresh=rpn_cfg.NEG_THRESH_TRAIN,
        batch_size_per_image=rpn_cfg.BATCH_SIZE_TRAIN, positive_fraction=rpn_cfg.POS_FRAC_TRAIN,
        pre_nms_top_n=dict(training=rpn_cfg.PRE_NMS_TOPN_TRAIN, testing=rpn_cfg.PRE_NMS_TOPN_TEST),
        post_nms_top_n=dict(training=rpn_cfg.POST_NMS_TOPN_TRAIN,
                            testing=rpn_cfg.POST_NMS_TOPN_TEST),
        nms_thresh=rpn_cfg.NMS_THRESH, score_thresh=rpn_cfg.get("SCORE_THRESH", 0.0))

    roi_cfg = cfg.MODEL.ROI_HEAD
    loss_cfg = cfg.MODEL.LOSS
    roi_heads = SeqRoIHeads(
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], ROI_OUTPUT_SIZE, 2),
        box_head=BoxHead(),
        faster_rcnn_predictor=FastRCNNPredictor(REPRESENTATION_SIZE, 2),
        reid_head=BoxHead(),
        embedding_head=NormAwareEmbedding(),
        box_predictor=BBoxRegressor(REPRESENTATION_SIZE, 2),
        reid_loss=OIMLoss(EMBEDDING_DIM, loss_cfg.LUT_SIZE, loss_cfg.CQ_SIZE,
                          loss_cfg.OIM_MOMENTUM, loss_cfg.OIM_SCALAR),
        fg_iou_thresh=roi_cfg.POS_THRESH_TRAIN, bg_iou_thresh=roi_cfg.NEG_THRESH_TRAIN,
        batch_size_per_image=roi_cfg.BATCH_SIZE_TRAIN, positive_fraction=roi_cfg.POS_FRAC_TRAIN,
        score_thresh=roi_cfg.SCORE_THRESH_TEST, nms_thresh=roi_cfg.NMS_THRESH_TEST,
        detections_per_img=roi_cfg.DETECTIONS_PER_IMAGE_TEST)

    min_size = cfg.INPUT.MIN_SIZE
    if isinstance(min_size, (list, tuple)):
        min_size = tuple(int(s) for s in min_size)
    transform = GeneralizedRCNNTransform(min_size=min_size, max_size=int(cfg.INPUT.MAX_SIZE),
                                         image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
                                         size_divisible=32)
    solver = cfg.SOLVER
    loss_weights = {
        "loss_rpn_reg": solver.LW_RPN_REG, "loss_rpn_cls": solver.LW_RPN_CLS,
        "loss_proposal_reg": solver.LW_PROPOSAL_REG, "loss_proposal_cls": solver.LW_PROPOSAL_CLS,
        "loss_box_reid": solver.LW_BOX_REID,
    }
    return SeqNetFPN(backbone, rpn, roi_heads, transform, loss_weights)
