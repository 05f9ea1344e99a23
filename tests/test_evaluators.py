"""One evaluator per dataset (engine/evaluators.py): each gives what the protocol functions give
when called directly with its settings, records those settings as metrics.json does, and refuses
a gallery of another dataset."""

import pytest

from configs import load_config
from engine.evaluation import eval_detection, eval_search_cuhk, eval_search_prw
from engine.evaluators import CUHKSYSUEvaluator, PRWEvaluator, build_evaluator, evaluator_for
from tools.bench_eval import build_cuhk, build_prw


def _raw(entry):
    _g, _q, gd, gf, qbf, qd, qf = entry
    return {"gallery_dets": gd, "gallery_feats": gf, "query_box_feats": qbf, "query_dets": qd, "query_feats": qf}


@pytest.fixture(scope="module")
def worlds():
    return {"CUHK-SYSU": build_cuhk(0, n_img=120, n_query=30), "PRW": build_prw(1, n_img=120, n_query=30, n_ids=15)}


@pytest.mark.parametrize("settings", [dict(gallery_size=50, cbgm=False), dict(gallery_size=100, cbgm=True),
                                      dict(gallery_size=-1, cbgm=False)])
def test_cuhk_evaluator_is_the_cuhk_protocol(worlds, settings):
    g, q, gd, gf, qbf, qd, qf = worlds["CUHK-SYSU"]
    got = evaluator_for("CUHK-SYSU", **settings).evaluate(g, q, _raw(worlds["CUHK-SYSU"]))
    recall, ap = eval_detection(g, gd, det_thresh=0.01)
    search = eval_search_cuhk(g, q, gd, gf, qbf, qd, qf, **settings)
    assert got == {"det_recall": recall, "det_ap": ap, "mAP": search["mAP"], "top1": search["accs"][0],
                   "top5": search["accs"][1], "top10": search["accs"][2]}
    assert 0 < got["mAP"] < 1 and 0 < got["det_ap"] < 1


@pytest.mark.parametrize("cross_camera, cbgm", [(False, False), (True, True)])
def test_prw_evaluator_is_the_prw_protocol(worlds, cross_camera, cbgm):
    g, q, gd, gf, qbf, qd, qf = worlds["PRW"]
    got = evaluator_for("PRW", cross_camera=cross_camera, cbgm=cbgm).evaluate(g, q, _raw(worlds["PRW"]))
    search = eval_search_prw(g, q, gd, gf, qbf, qd, qf, cbgm=cbgm, ignore_cam_id=not cross_camera)
    assert got["mAP"] == search["mAP"] and got["top1"] == search["accs"][0]
    other = evaluator_for("PRW", cross_camera=not cross_camera, cbgm=cbgm).evaluate(g, q, _raw(worlds["PRW"]))
    assert other["mAP"] != got["mAP"]  # the setting matters here


def test_built_from_the_config_with_its_settings(worlds):
    cuhk = build_evaluator(load_config(None, ["EVAL_GALLERY_SIZE", "4000", "EVAL_USE_CBGM", "True"]))
    assert isinstance(cuhk, CUHKSYSUEvaluator)
    assert cuhk.settings() == {"dataset": "CUHK-SYSU", "gallery_size": 4000, "cross_camera": None, "cbgm": True}
    prw = build_evaluator(load_config(None, ["INPUT.DATASET", "PRW", "EVAL_CROSS_CAMERA", "True"]))
    assert isinstance(prw, PRWEvaluator)
    assert prw.settings() == {"dataset": "PRW", "gallery_size": None, "cross_camera": True, "cbgm": False}
    assert prw.describe() == "PRW, cross-camera, no CBGM" and cuhk.describe() == "CUHK-SYSU, gallery 4000, CBGM"
    with pytest.raises(ValueError, match="a PRW evaluator was given the CUHK-SYSU gallery"):
        prw.evaluate(worlds["CUHK-SYSU"][0], worlds["CUHK-SYSU"][1], _raw(worlds["CUHK-SYSU"]))
    with pytest.raises(ValueError, match="no evaluator for dataset 'Market'"):
        evaluator_for("Market")
