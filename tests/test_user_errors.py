"""Errors in what a user gives end with one message, not a traceback (DDPS_DEBUG=1 shows it), and
a checkpoint holding code never runs it unless the user converts it with --trust-code."""
import os
import subprocess
import sys

import pytest
import torch

from models.checkpoint import UnsafeCheckpointError, load_checkpoint_file
from tests.conftest import ROOT
from tools import convert_checkpoint
from utils.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run_cli(args, env_extra=None, cwd=ROOT):
    env = dict(os.environ)
    env.pop("DDPS_DEBUG", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["train_ddps.py", "--cfg", "no/such.yaml"], "cannot read config file no/such.yaml"),
    (["train_ddps.py", "--cfg", "configs/cuhk_sysu/resnet18/base.yaml", "SOLVER.BASE_RL", "0.1"],
     "SOLVER.BASE_RL"),
    (["train_ddps.py", "--eval", "--ckpt", "no/such.pth", "INPUT.DATA_ROOT", "no/such/root"], "no/such/root"),
])
def test_user_errors_end_with_one_message_and_exit_status_2(args, message):
    result = run_cli(args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "DDPS_DEBUG=1" in result.stderr


def test_debug_switch_shows_the_traceback():
    result = run_cli(["train_ddps.py", "--cfg", "no/such.yaml"], {"DDPS_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


class _LeavesAMark:
    """Unpickling this object runs code: it creates the file named at pickling time."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_holding_code_is_refused_and_converted_only_on_trust(tmp_path):
    marker = tmp_path / "code_ran"
    weights = {"backbone.weight": torch.arange(6.0).reshape(2, 3)}
    path = tmp_path / "pickled.pth"
    torch.save({"model": weights, "epoch": 3, "extra": _LeavesAMark(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"pickled\.pth holds Python objects .*--trust-code"):
        load_checkpoint_file(str(path))
    assert not marker.exists()
    with pytest.raises(UserError, match="pass --trust-code"):
        convert_checkpoint.main([str(path), str(tmp_path / "safe.pth")])
    assert not marker.exists() and not (tmp_path / "safe.pth").exists()

    convert_checkpoint.main([str(path), str(tmp_path / "safe.pth"), "--trust-code"])
    assert marker.exists()  # the risk the flag names: the file's code ran, once
    marker.unlink()
    safe = load_checkpoint_file(str(tmp_path / "safe.pth"))
    assert set(safe) == {"model", "epoch"} and torch.equal(safe["model"]["backbone.weight"], weights["backbone.weight"])
    assert not marker.exists()
    with pytest.raises(UserError, match="exists"):  # never writes over a file
        convert_checkpoint.main([str(path), str(tmp_path / "safe.pth"), "--trust-code"])


def test_converter_turns_a_whole_model_object_into_its_state_dict(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save({"model": model, "epoch": 1}, tmp_path / "object.pth")
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        load_checkpoint_file(str(tmp_path / "object.pth"))
    convert_checkpoint.main([str(tmp_path / "object.pth"), str(tmp_path / "plain.pth"), "--trust-code"])
    plain = load_checkpoint_file(str(tmp_path / "plain.pth"))
    assert torch.equal(plain["model"]["weight"], model.weight.detach())
