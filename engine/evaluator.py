"""Evaluation runner: model -> raw outputs (eval_cache.pth) -> protocols -> metrics.json.

Evaluators are separate from models: this module only knows the model's inference interface
(`engine.inference`) and the protocol functions (`engine.evaluation`).
"""
import json
import os
import time

from datasets.loaders import build_test_loaders
from engine.evaluators import build_evaluator
from engine.inference import model_fingerprint, run_inference
from engine.raw_outputs import KEYS as RAW_OUTPUT_KEYS
from engine.raw_outputs import RawOutputs
from utils.dist import broadcast_object, is_main_process
from utils.errors import UserError
from utils.misc import atomic_write_json

CACHE_NAME = "eval_cache.pth"
METRICS_NAME = "metrics.json"


class StaleCacheError(UserError, RuntimeError):
    """EVAL_USE_CACHE was asked for but the cache on disk came from another model or setting."""


def inference_settings(cfg):
    """What, besides the weights, decides the raw outputs: a cache must match all of it."""
    return {
        "dataset": cfg.INPUT.DATASET,
        "data_root": os.path.abspath(cfg.INPUT.DATA_ROOT),
        "min_size": cfg.INPUT.MIN_SIZE,
        "max_size": cfg.INPUT.MAX_SIZE,
        "use_gt": bool(cfg.EVAL_USE_GT),
        "score_thresh_test": cfg.MODEL.ROI_HEAD.SCORE_THRESH_TEST,
        "nms_thresh_test": cfg.MODEL.ROI_HEAD.NMS_THRESH_TEST,
        "detections_per_image_test": cfg.MODEL.ROI_HEAD.DETECTIONS_PER_IMAGE_TEST,
        "rpn_pre_nms_topn_test": cfg.MODEL.RPN.PRE_NMS_TOPN_TEST,
        "rpn_post_nms_topn_test": cfg.MODEL.RPN.POST_NMS_TOPN_TEST,
        "rpn_nms_thresh": cfg.MODEL.RPN.NMS_THRESH,
        "rpn_score_thresh": cfg.MODEL.RPN.SCORE_THRESH,
        # not weights, but they change the outputs too: the anchors, and bf16 / fp16 inference
        "anchor_sizes": cfg.MODEL.ANCHOR_SIZES,
        "anchor_aspect_ratios": cfg.MODEL.ANCHOR_ASPECT_RATIOS,
        "amp": cfg.SOLVER.AMP,
    }


RAW_KEYS = RAW_OUTPUT_KEYS


def read_cache(path):
    """The raw outputs saved at ``path`` (a RawOutputs: ``raw["gallery_dets"]``, ``raw.meta``).

    Read without executing code (``weights_only=True``, or the packed copy with
    ``allow_pickle=False``): a cache in a folder someone else could write to can never run code
    when it is loaded."""
    return RawOutputs.load(path)


def _comparable(value):
    """Settings as JSON gives them back (tuples become lists), for comparing across formats."""
    return json.loads(json.dumps(value))


def load_cache(path, fingerprint, settings):
    """Load a raw-output cache, refusing one written by another model or with other settings."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EVAL_USE_CACHE is set but there is no cache at {path}")
    raw = read_cache(path)
    meta = raw.meta
    if meta.get("model_fingerprint") != fingerprint:
        raise StaleCacheError(
            f"{path} was written by another model (checkpoint {meta.get('checkpoint')!r}, "
            f"fingerprint {str(meta.get('model_fingerprint'))[:12]}) than the one being evaluated "
            f"(fingerprint {fingerprint[:12]}). Delete it or evaluate without EVAL_USE_CACHE."
        )
    cached, now = _comparable(meta.get("settings", {})), _comparable(settings)
    if cached != now:
        diff = {k: (cached.get(k), v) for k, v in now.items() if cached.get(k) != v}
        raise StaleCacheError(f"{path} was written with other settings (cached, now): {diff}")
    return raw


def save_cache(path, raw, fingerprint, settings, checkpoint):
    """Write the raw outputs (eval_cache.pth and its packed copy) atomically."""
    meta = dict(model_fingerprint=fingerprint, settings=settings, checkpoint=checkpoint)
    RawOutputs.from_dict(raw.lists() if isinstance(raw, RawOutputs) else raw, meta).save(path)


def build_evaluation_inputs(cfg):
    """(gallery_loader, query_loader) of the config's test splits, with every file the
    configured protocol reads (TestG<N>.mat, query_info.txt, ...) opened and checked now: an
    evaluation, or a training run that ends with one, stops at a missing file before its
    expensive work, not after it."""
    gallery_loader, query_loader = build_test_loaders(cfg)
    build_evaluator(cfg).check_inputs(gallery_loader.dataset, query_loader.dataset)
    return gallery_loader, query_loader


def compute_metrics(cfg, gallery_dataset, query_dataset, raw):
    """The detection and search metrics of the configured dataset's evaluator on raw outputs."""
    return build_evaluator(cfg).evaluate(gallery_dataset, query_dataset, raw)


def evaluate(model, cfg, gallery_loader, query_loader, device, checkpoint=None, epoch=None, log=print,
             use_cache=None):
    """Evaluate `model`, write eval_cache.pth and metrics.json into OUTPUT_DIR, return the metrics.

    Distributed, every process must call it: each runs inference on its share of the images,
    process 0 gathers the outputs, writes the files and returns the metrics (None elsewhere).

    `use_cache` (default: cfg.EVAL_USE_CACHE) re-uses the raw outputs in OUTPUT_DIR when they come
    from the same weights and settings. The training loop passes False: each of its evaluations is
    of new weights, so a cache there is always the previous epoch's (EVAL_USE_CACHE concerns
    re-evaluating a checkpoint, `--eval`)."""
    use_cache = bool(cfg.EVAL_USE_CACHE) if use_cache is None else bool(use_cache)
    main = is_main_process()
    output_dir = cfg.OUTPUT_DIR
    cache_path = os.path.join(output_dir, CACHE_NAME)
    fingerprint = model_fingerprint(model)
    settings = inference_settings(cfg)
    evaluator = build_evaluator(cfg)
    metrics_path = os.path.join(output_dir, METRICS_NAME)
    log(describe_evaluation(evaluator, cfg, checkpoint, epoch, gallery_loader.dataset, query_loader.dataset))
    start = time.time()
    raw, refusal = None, None
    if main and use_cache and os.path.isfile(cache_path):
        try:
            raw = load_cache(cache_path, fingerprint, settings)
        except StaleCacheError as exc:
            refusal = exc
    # process 0 decides; distributed, every process learns whether to run inference (or stop)
    decision = broadcast_object("stop" if refusal else "cached" if raw is not None else "run")
    if decision == "stop":
        if refusal is not None:
            raise refusal
        raise StaleCacheError(f"process 0 refused the cache at {cache_path}")
    if decision == "cached":
        log(f"Using the raw outputs cached in {cache_path}")
    else:
        if use_cache:
            log(f"EVAL_USE_CACHE: no cache at {cache_path} yet, computing it")
        raw = run_inference(
            model, gallery_loader, query_loader, device, use_gt=bool(cfg.EVAL_USE_GT), amp=cfg.SOLVER.AMP
        )
        if not main:
            return None  # process 0 holds the gathered outputs and writes the results
        os.makedirs(output_dir, exist_ok=True)
        save_cache(cache_path, raw, fingerprint, settings, checkpoint)
    if not main:
        return None
    inference_time = time.time() - start
    metrics = evaluator.evaluate(gallery_loader.dataset, query_loader.dataset, raw)
    metrics.update(
        checkpoint=checkpoint,
        epoch=epoch,
        **evaluator.settings(),
        use_gt=bool(cfg.EVAL_USE_GT),
        model_fingerprint=fingerprint,
        inference_seconds=round(inference_time, 3),
        num_gallery_images=len(gallery_loader.dataset),
        num_queries=len(query_loader.dataset),
    )
    atomic_write_json(metrics_path, metrics)
    log(
        "det recall {det_recall:.4f}  det AP {det_ap:.4f}  mAP {mAP:.4f}  "
        "top-1 {top1:.4f}  top-5 {top5:.4f}  top-10 {top10:.4f}".format(**metrics)
    )
    log(f"wrote {metrics_path} (metrics and settings) and {cache_path} (raw outputs)")
    return metrics


def describe_evaluation(evaluator, cfg, checkpoint, epoch, gallery_dataset, query_dataset) -> str:
    """One line saying what is evaluated and how, printed before every evaluation."""
    source = checkpoint or "the model in memory"
    if epoch is not None:
        source += f" (epoch {epoch})"
    boxes = "ground-truth boxes" if cfg.EVAL_USE_GT else "detected boxes"
    return (f"evaluating {source}: {evaluator.describe()}, {boxes}; {len(gallery_dataset)} gallery images, "
            f"{len(query_dataset)} queries from {gallery_dataset.root}")
