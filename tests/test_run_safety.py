"""What a training or evaluation run does with the user's files and settings:

- a new run refuses a folder holding another run (--resume continues it, --overwrite replaces it)
  and leaves that run's files byte for byte as they were;
- a run stopped by a start-up check (too small LUT_SIZE, a missing evaluation file) has written
  nothing; everything an evaluation needs is checked before training or inference;
- temporary files of an interrupted write are removed at the next start; results get the
  user's normal permissions;
- --resume applies the schedule settings of the command (BASE_LR, milestones, ...) from the resume
  point, says so, and config.yaml records them; unresumable checkpoints are named with the reason;
- every evaluation says what it evaluates, with which settings, and where it wrote.
"""
import os
import shutil
import stat

import pytest
import torch
import yaml

import train_ddps
from configs import ConfigError
from datasets import DatasetError
from engine.output_dir import OutputDirInUseError, check_output_dir, claim_output_dir
from models.checkpoint import CheckpointFileError, CheckpointMismatchError
from tests.helpers import mini_world, one_torch_thread, small_cfg, small_opts  # noqa: F401
from utils.fileio import atomic_write_bytes, remove_stale_temp_files


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mini_world(tmp_path_factory.mktemp("mini_world"))


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished one-epoch run (two steps) on the mini CUHK-SYSU world."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_ddps.main(small_opts(world, output_dir=out))
    return out


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))
            if (folder / name).is_file()}


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ one run per folder
def test_new_run_into_a_used_folder_is_refused_and_leaves_it_untouched(finished, world, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(OutputDirInUseError, match=r"already holds a run .*epoch_0\.pth.*--resume --ckpt .*"
                                                  r"epoch_0\.pth.*--overwrite"):
        train_ddps.main(small_opts(world, output_dir=run, SEED=5))
    assert snapshot(run) == before


def test_overwrite_replaces_the_earlier_run_and_resume_continues_it(finished, world, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / "epoch_7.pth").write_bytes((run / "epoch_0.pth").read_bytes())  # a later epoch of that run
    old = (run / "epoch_0.pth").read_bytes()
    train_ddps.main(["--overwrite"] + small_opts(world, output_dir=run, SEED=5))
    assert not (run / "epoch_7.pth").exists()  # nothing of the earlier run is left to mix in
    assert (run / "epoch_0.pth").read_bytes() != old
    assert yaml.safe_load((run / "config.yaml").read_text())["SEED"] == 5
    # --resume from a checkpoint of the folder itself is the run going on
    assert check_output_dir(str(run), resume_from=str(run / "epoch_0.pth")) != []


def test_resume_into_another_runs_folder_is_refused(finished, tmp_path):
    other = copy_run(finished, tmp_path / "other")
    elsewhere = copy_run(finished, tmp_path / "elsewhere")
    with pytest.raises(OutputDirInUseError, match="holds another run"):
        check_output_dir(str(other), resume_from=str(elsewhere / "epoch_0.pth"))
    assert check_output_dir(str(tmp_path / "new"), resume_from=str(elsewhere / "epoch_0.pth")) == []


def test_a_failed_start_up_check_writes_nothing(finished, world, tmp_path):
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match="MODEL.LOSS.LUT_SIZE is 2 .* at least 4"):
        train_ddps.main(small_opts(world, output_dir=fresh, MODEL__LOSS__LUT_SIZE=2))
    assert not fresh.exists()
    # --overwrite of a run, stopped by the check: the run and its config.yaml stay as they were
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(ConfigError, match="LUT_SIZE"):
        train_ddps.main(["--overwrite"] + small_opts(world, output_dir=run, MODEL__LOSS__LUT_SIZE=2))
    assert snapshot(run) == before


def _prw_world_without(world, tmp_path, name):
    root = tmp_path / "world"
    shutil.copytree(world, root)
    os.remove(root / "PRW" / name)
    return root


@pytest.mark.parametrize("missing", ["frame_test.mat", "query_info.txt"])
def test_training_checks_the_evaluation_files_before_it_trains(world, tmp_path, monkeypatch, missing):
    root = _prw_world_without(world, tmp_path, missing)
    monkeypatch.setattr(train_ddps.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(DatasetError, match=missing):
        train_ddps.main(small_opts(root, "PRW", output_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_training_and_eval_check_the_gallery_size_file_first(world, tmp_path, monkeypatch):
    root = tmp_path / "world"
    shutil.copytree(world, root)
    monkeypatch.setattr(train_ddps.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(DatasetError, match=r"missing annotation file: .*TestG500\.mat"):  # TestG50 / 100 only
        train_ddps.main(small_opts(root, output_dir=tmp_path / "out", EVAL_GALLERY_SIZE=500))
    os.remove(root / "CUHK-SYSU" / "annotation" / "test" / "train_test" / "TestG100.mat")
    monkeypatch.setattr(train_ddps, "build_eval_model", lambda *a, **k: pytest.fail("model built"))
    with pytest.raises(DatasetError, match="TestG100.mat"):
        train_ddps.main(["--eval", "--ckpt", str(tmp_path / "any.pth")] + small_opts(root, output_dir=tmp_path / "e"))


# ------------------------------------------------------------------ files as the user expects them
def test_results_get_the_users_normal_permissions(tmp_path):
    previous = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640  # 0666 minus the umask, not 0600


def test_finished_run_files_are_readable_like_config_yaml(finished):
    modes = {name: stat.S_IMODE(os.stat(finished / name).st_mode) for name in os.listdir(finished)
             if (finished / name).is_file()}
    assert len(set(modes.values())) == 1, modes  # checkpoints, metrics, cache: as config.yaml


def test_temporary_files_of_an_interrupted_write_are_removed_at_the_next_start(finished, world, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    debris = [run / ".epoch_3.pth.k2j4_x9q.tmp", run / ".metrics.json.abcdefgh.tmp"]
    for path in debris:
        path.write_bytes(b"half a checkpoint")
    keep = [run / "notes.tmp", run / ".hidden", run / "my.abcdefgh.tmp"]  # not names our writer makes
    for path in keep:
        path.write_text("mine")
    assert sorted(remove_stale_temp_files(run)) == sorted(map(str, debris))
    for path in debris:
        path.write_bytes(b"half a checkpoint")
    claim_output_dir(small_cfg(world, output_dir=run), earlier=[], log=lambda *a: None)
    assert not any(p.exists() for p in debris) and all(p.exists() for p in keep)


# ------------------------------------------------------------------ resume with new settings
def test_resume_applies_the_new_schedule_and_config_yaml_records_it(finished, world, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    opts = small_opts(world, output_dir=run, SOLVER__BASE_LR=0.5, SOLVER__MAX_EPOCHS=3,
                      SOLVER__LR_DECAY_MILESTONES="[3]", SOLVER__GAMMA=0.2, SOLVER__WEIGHT_DECAY=0.001)
    train_ddps.main(["--resume", "--ckpt", str(run / "epoch_0.pth")] + opts)
    out = capsys.readouterr().out
    for key, value in (("BASE_LR", 0.5), ("MAX_EPOCHS", 3), ("GAMMA", 0.2), ("WEIGHT_DECAY", 0.001)):
        assert f"resume: SOLVER.{key} is {value}" in out
    epoch1 = torch.load(run / "epoch_1.pth", weights_only=True)
    epoch2 = torch.load(run / "epoch_2.pth", weights_only=True)
    # the LR a checkpoint holds is that of the next epoch's first step: BASE_LR for epoch 2,
    # BASE_LR x GAMMA for epoch 3 (the new milestone)
    assert [g["lr"] for g in epoch1["optimizer"]["param_groups"]] == [0.5]
    assert epoch2["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.5 * 0.2)
    assert epoch2["optimizer"]["param_groups"][0]["weight_decay"] == 0.001
    recorded = yaml.safe_load((run / "config.yaml").read_text())["SOLVER"]
    assert (recorded["BASE_LR"], recorded["MAX_EPOCHS"], recorded["LR_DECAY_MILESTONES"]) == (0.5, 3, [3])
    assert yaml.safe_load(epoch2["config"])["SOLVER"]["BASE_LR"] == 0.5


def test_resume_of_a_finished_run_without_more_epochs_is_an_error(finished, world):
    with pytest.raises(ConfigError, match="ends epoch 0, and SOLVER.MAX_EPOCHS is 1: nothing is left"):
        train_ddps.main(["--resume", "--ckpt", str(finished / "epoch_0.pth")] + small_opts(world, output_dir=finished))


def test_unresumable_checkpoints_are_named_with_the_reason(finished, world, tmp_path):
    ckpt = torch.load(finished / "epoch_0.pth", weights_only=True)
    distilled = dict(ckpt, model={"student": ckpt["model"]})
    torch.save(distilled, tmp_path / "ddps.pth")
    torch.save({"model": ckpt["model"]}, tmp_path / "weights.pth")
    opts = small_opts(world, output_dir=tmp_path / "out", SOLVER__MAX_EPOCHS=2)
    with pytest.raises(CheckpointMismatchError, match=r"ddps\.pth is the checkpoint of a distillation run .* "
                                                      r"trains a single model"):
        train_ddps.main(["--resume", "--ckpt", str(tmp_path / "ddps.pth")] + opts)
    with pytest.raises(CheckpointFileError, match=r"weights\.pth cannot be resumed.*found \['model'\]"):
        train_ddps.main(["--resume", "--ckpt", str(tmp_path / "weights.pth")] + opts)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, reason", [
    (b"", "an empty file"),
    (b"epoch_19.pth\n", "not a readable PyTorch checkpoint|cannot read"),
    ("half", "cannot read checkpoint .*damaged"),
])
def test_a_file_that_is_not_a_checkpoint_is_named(finished, world, tmp_path, content, reason):
    path = tmp_path / "bad.pth"
    if content == "half":
        data = (finished / "epoch_0.pth").read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointFileError, match=reason) as err:
        train_ddps.main(["--eval", "--ckpt", str(path)] + small_opts(world, output_dir=tmp_path / "eval"))
    assert str(path) in str(err.value)


# ------------------------------------------------------------------ what an evaluation says
def test_every_evaluation_says_what_it_evaluates_and_where_it_wrote(finished, world, tmp_path, capsys):
    out = tmp_path / "eval"
    ckpt = finished / "epoch_0.pth"
    train_ddps.main(["--eval", "--ckpt", str(ckpt)] + small_opts(world, output_dir=out, EVAL_USE_CBGM=True))
    text = capsys.readouterr().out
    assert f"evaluating {ckpt} (epoch 0): CUHK-SYSU, gallery 100, CBGM, detected boxes;" in text
    assert f"wrote {out / 'metrics.json'} (metrics and settings) and {out / 'eval_cache.pth'}" in text
