"""tools/export.py: the exported pipeline (TorchScript in torch, ONNX in onnxruntime) gives the
eager model's boxes, scores and embeddings on images of several sizes (upscaled, downscaled,
portrait, sizes where the resized side floors differently in float32 and float64), and the same
ranking of a query."""
import pytest
import torch
from PIL import Image

from configs import dump_config
from engine.export_check import PARITY_TOLERANCE, compare_exported, load_exported
from models import build_model
from tests.helpers import mini_world, one_torch_thread, small_cfg  # noqa: F401
from tools import export

# MIN_SIZE 120 / MAX_SIZE 160: 240 x 200 and 333 x 517 are sizes where float32 and float64
# scales floor to different resized sizes
SIZES = [(120, 160), (100, 150), (140, 120), (240, 200), (333, 517), (60, 80)]


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    world = mini_world(tmp / "world")
    cfg = small_cfg(world, MODEL__ROI_HEAD__SCORE_THRESH_TEST=0.3, MODEL__ROI_HEAD__DETECTIONS_PER_IMAGE_TEST=100)
    torch.manual_seed(0)
    model = build_model(cfg, role="baseline").eval()
    torch.save({"model": model.state_dict()}, tmp / "model.pth")
    dump_config(cfg, tmp / "config.yaml")
    for fmt, name in (("torchscript", "model.pt"), ("onnx", "model.onnx")):
        export.main(["--cfg", str(tmp / "config.yaml"), "--ckpt", str(tmp / "model.pth"), "--format", fmt,
                     "--out", str(tmp / name), "--check-sizes", "120", "160"])
    return dict(tmp=tmp, model=model, world=world)


@pytest.mark.parametrize("fmt, files, exact", [("torchscript", ["model.pt"], True),
                                               ("onnx", ["model.onnx", "model.query.onnx"], False)])
def test_export_matches_the_model_on_several_sizes(exported_run, fmt, files, exact):
    exported = load_exported(fmt, *[str(exported_run["tmp"] / f) for f in files])
    rows = compare_exported(exported_run["model"], exported, SIZES)
    tol = {k: 1e-6 for k in PARITY_TOLERANCE} if exact else PARITY_TOLERANCE
    assert sum(r["detections"] for r in rows) > 20  # the comparison has something to compare
    for r in rows:
        assert r["detections_exported"] == r["detections"], r
        assert r["boxes_px"] <= tol["box_px"] and r["scores"] <= tol["score"], r
        assert r["embeddings"] <= tol["embedding"] and r["query_embedding"] <= tol["embedding"], r
        assert r["same_ranking"], r


def test_export_on_a_real_picture_and_refuses_to_overwrite(exported_run):
    import numpy as np

    tmp = exported_run["tmp"]
    path = sorted((exported_run["world"] / "CUHK-SYSU" / "Image" / "SSM").glob("*.jpg"))[0]
    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    exported = load_exported("onnx", str(tmp / "model.onnx"), str(tmp / "model.query.onnx"))
    with torch.no_grad():
        det = exported_run["model"]([image.contiguous()])[0]
    boxes, scores, emb = exported.gallery(image.contiguous().numpy())
    assert boxes.shape == tuple(det["boxes"].shape) and np.allclose(boxes, det["boxes"].numpy(), atol=0.05)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    from utils.errors import UserError

    with pytest.raises(UserError, match="model.onnx.*exists"):
        export.main(["--cfg", str(tmp / "config.yaml"), "--ckpt", str(tmp / "model.pth"), "--format", "onnx",
                     "--out", str(tmp / "model.onnx")])
