"""One evaluator per dataset, as detectron2's DatasetEvaluator: a dataset's protocol settings and
the metrics of raw outputs (engine.raw_outputs) under them.

    evaluator = build_evaluator(cfg)                      # from INPUT.DATASET and the EVAL_* keys
    evaluator = evaluator_for("PRW", cross_camera=True)   # or by name
    metrics = evaluator.evaluate(gallery_dataset, query_dataset, raw)

Both give the detection metrics (recall and AP of the detections from score 0.01 on, the
original's det_thresh) and the search metrics of the dataset's protocol (engine.evaluation):
CUHK-SYSU per gallery size (TestG<N>.mat, or -1 for the whole gallery), PRW over all cameras or
across cameras; CBGM for either. ``settings()`` is what the metrics were computed with, as
metrics.json records it.
"""
from __future__ import annotations

from typing import Dict

from engine.evaluation import eval_detection, eval_search_cuhk, eval_search_prw

# Detections enter the detection protocol from this score on (the original's det_thresh 0.01).
DETECTION_EVAL_THRESH = 0.01
METRIC_KEYS = ("det_recall", "det_ap", "mAP", "top1", "top5", "top10")


class PersonSearchEvaluator:
    """Common part: detection, the metrics dict, the settings. A subclass names its dataset, its
    one protocol setting (``setting``: the metrics.json key, also its constructor argument and
    attribute) and the config key it comes from, and runs its dataset's search."""

    dataset = ""
    setting = ""  # "gallery_size" | "cross_camera"
    config_key = ""  # EVAL_GALLERY_SIZE | EVAL_CROSS_CAMERA
    SETTING_KEYS = ("gallery_size", "cross_camera")  # every dataset's, as metrics.json lists them

    def __init__(self, cbgm: bool = False):
        self.cbgm = bool(cbgm)

    @classmethod
    def from_config(cls, cfg) -> "PersonSearchEvaluator":
        return cls(**{cls.setting: cfg[cls.config_key]}, cbgm=cfg.EVAL_USE_CBGM)

    def settings(self) -> Dict:
        """The protocol settings, with the keys of metrics.json (None where they do not apply)."""
        out = {"dataset": self.dataset, **{k: None for k in self.SETTING_KEYS}, "cbgm": self.cbgm}
        out[self.setting] = getattr(self, self.setting)
        return out

    def describe(self) -> str:
        """E.g. "CUHK-SYSU, gallery 100, CBGM" or "PRW, all cameras, no CBGM"."""
        return f"{self.dataset}, {self._describe_setting()}, " + ("CBGM" if self.cbgm else "no CBGM")

    def _describe_setting(self) -> str:
        raise NotImplementedError

    def check_inputs(self, gallery_dataset, query_dataset) -> None:
        """Open and check now what the search protocol will read (besides the two splits), so
        that a missing or broken file stops a run before inference or training, not after."""

    def detection(self, gallery_dataset, raw):
        """(recall, AP) of the gallery detections."""
        return eval_detection(gallery_dataset, raw["gallery_dets"], det_thresh=DETECTION_EVAL_THRESH)

    def search(self, gallery_dataset, query_dataset, raw) -> Dict:
        """The search protocol's result dict (mAP, accs = top-1/5/10, per-query values)."""
        raise NotImplementedError

    def _search_inputs(self, gallery_dataset, query_dataset, raw) -> Dict:
        return dict(gallery_dataset=gallery_dataset, query_dataset=query_dataset,
                    gallery_dets=raw["gallery_dets"], gallery_feats=raw["gallery_feats"],
                    query_box_feats=raw["query_box_feats"], query_dets=raw["query_dets"],
                    query_feats=raw["query_feats"], cbgm=self.cbgm)

    def evaluate(self, gallery_dataset, query_dataset, raw) -> Dict[str, float]:
        """det_recall, det_ap, mAP, top1, top5, top10 (fractions)."""
        if gallery_dataset.name != self.dataset:
            raise ValueError(f"a {self.dataset} evaluator was given the {gallery_dataset.name} gallery")
        det_recall, det_ap = self.detection(gallery_dataset, raw)
        search = self.search(gallery_dataset, query_dataset, raw)
        accs = [float(a) for a in search["accs"]]
        return {"det_recall": float(det_recall), "det_ap": float(det_ap), "mAP": float(search["mAP"]),
                "top1": accs[0], "top5": accs[1], "top10": accs[2]}


class CUHKSYSUEvaluator(PersonSearchEvaluator):
    dataset, setting, config_key = "CUHK-SYSU", "gallery_size", "EVAL_GALLERY_SIZE"

    def __init__(self, gallery_size: int = 100, cbgm: bool = False):
        super().__init__(cbgm)
        self.gallery_size = int(gallery_size)

    def _describe_setting(self):
        return "whole gallery" if self.gallery_size == -1 else f"gallery {self.gallery_size}"

    def check_inputs(self, gallery_dataset, query_dataset):
        # TestG<N>.mat (parsed once, then cached) and the query order it defines
        gallery_dataset.load_protocol(self.gallery_size, query_dataset)

    def search(self, gallery_dataset, query_dataset, raw):
        return eval_search_cuhk(gallery_size=self.gallery_size,
                                **self._search_inputs(gallery_dataset, query_dataset, raw))


class PRWEvaluator(PersonSearchEvaluator):
    dataset, setting, config_key = "PRW", "cross_camera", "EVAL_CROSS_CAMERA"

    def __init__(self, cross_camera: bool = False, cbgm: bool = False):
        super().__init__(cbgm)
        self.cross_camera = bool(cross_camera)

    def _describe_setting(self):
        return "cross-camera" if self.cross_camera else "all cameras"

    def search(self, gallery_dataset, query_dataset, raw):
        return eval_search_prw(ignore_cam_id=not self.cross_camera,
                               **self._search_inputs(gallery_dataset, query_dataset, raw))


EVALUATORS = {"CUHK-SYSU": CUHKSYSUEvaluator, "PRW": PRWEvaluator}


def evaluator_for(dataset: str, **settings) -> PersonSearchEvaluator:
    if dataset not in EVALUATORS:
        raise ValueError(f"no evaluator for dataset {dataset!r}: expected one of {sorted(EVALUATORS)}")
    return EVALUATORS[dataset](**settings)


def build_evaluator(cfg) -> PersonSearchEvaluator:
    """The evaluator of cfg.INPUT.DATASET with the config's EVAL_* settings."""
    if cfg.INPUT.DATASET not in EVALUATORS:
        raise ValueError(f"no evaluator for INPUT.DATASET {cfg.INPUT.DATASET!r}")
    return EVALUATORS[cfg.INPUT.DATASET].from_config(cfg)
