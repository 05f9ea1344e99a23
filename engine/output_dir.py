"""A training run's OUTPUT_DIR: one run per folder, nothing written before the run can start.

A new training run (no --resume) into a folder that already holds a run's results
(``RUN_FILES``: checkpoints, config.yaml, metrics.json, the evaluation cache, TensorBoard
scalars) is refused: it would replace that run's checkpoints one by one and leave a mix of two
runs. The message says how to continue that run (--resume) or to replace it (--overwrite).

``check_output_dir`` is the cheap check, done before any data or model is built. After every
start-up check has passed, ``claim_output_dir`` (process 0) prepares the folder: it removes the
temporary files an interrupted write left there, with --overwrite removes the earlier run's
files (each named in the log), and writes config.yaml. A run that stops at a start-up check has
therefore written nothing, and the folder's config.yaml always describes the checkpoints beside
it.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import List, Optional

from configs import dump_config
from utils.errors import UserError
from utils.fileio import remove_stale_temp_files

__all__ = ["OutputDirInUseError", "RUN_FILES", "check_output_dir", "claim_output_dir", "earlier_run_files"]

# what a run leaves in its folder (glob patterns relative to OUTPUT_DIR)
RUN_FILES = ("epoch_*.pth", "config.yaml", "metrics.json", "eval_cache.pth", "eval_cache.pth.npz", "tensorboard")


class OutputDirInUseError(UserError):
    """OUTPUT_DIR holds another run's results and the command did not say what to do with them."""


def earlier_run_files(output_dir: str) -> List[str]:
    """The paths of a run's results in ``output_dir`` (sorted; empty when there are none)."""
    found = []
    for pattern in RUN_FILES:
        found += glob.glob(os.path.join(glob.escape(output_dir), pattern))
    return sorted(found)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_dir(output_dir: str, resume_from: Optional[str] = None, overwrite: bool = False) -> List[str]:
    """Refuse to start a new run in a folder holding another run; return that run's files.

    Allowed: an empty or new folder; ``--resume`` from a checkpoint in this very folder (the run
    continues); ``--overwrite`` (the earlier run is removed by ``claim_output_dir``)."""
    earlier = earlier_run_files(output_dir)
    if not earlier or overwrite:
        return earlier
    if resume_from is not None and _same_file(os.path.dirname(os.path.abspath(resume_from)), output_dir):
        return earlier
    shown = ", ".join(os.path.basename(p) for p in earlier[:6]) + (" ..." if len(earlier) > 6 else "")
    checkpoints = sorted(p for p in earlier if os.path.basename(p).startswith("epoch_"))
    resume = (f"to continue it: --resume --ckpt {checkpoints[-1]}; " if checkpoints else "")
    if resume_from is not None:
        what = (f"--resume continues the run of the checkpoint's own folder "
                f"({os.path.dirname(os.path.abspath(resume_from))}), but OUTPUT_DIR {output_dir} holds another run")
    else:
        what = f"OUTPUT_DIR {output_dir} already holds a run ({shown})"
    raise OutputDirInUseError(
        f"{what}; a new run there would replace its files. Choose another OUTPUT_DIR, {resume}"
        f"or pass --overwrite to delete that run's results and start anew.")


def claim_output_dir(cfg, earlier: List[str], overwrite: bool = False, log=print) -> None:
    """Prepare OUTPUT_DIR once every start-up check has passed (process 0 only): remove debris of
    interrupted writes, with ``overwrite`` the earlier run's files, then write config.yaml."""
    output_dir = cfg.OUTPUT_DIR
    os.makedirs(output_dir, exist_ok=True)
    for path in remove_stale_temp_files(output_dir):
        log(f"removed {path}, a temporary file left by an interrupted write")
    if overwrite and earlier:
        for path in earlier:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
        log(f"--overwrite: removed the earlier run's {', '.join(os.path.basename(p) for p in earlier)} "
            f"from {output_dir}")
    dump_config(cfg, os.path.join(output_dir, "config.yaml"))
