"""Shared data fixtures.

``synthetic_root`` writes a small synthetic person-search world once per test session (both
official layouts, see tools/make_synthetic.py) and returns the folder holding ``CUHK-SYSU/`` and
``PRW/``. Its sizes are in ``SYNTHETIC_TEST_OPTIONS`` (160 x 120 images):

- CUHK-SYSU: 20 training images (6 identities), a pool of 101 gallery images, 8 queries,
  TestG50.mat and TestG100.mat;
- PRW: 20 training frames (6 identities, non-contiguous pids incl. 932), 30 test frames,
  8 test identities with one query each, cameras c1..c6.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import utils.runtime_env  # noqa: F401,E402  (before torch: passive OpenMP waits, freed memory kept)

SYNTHETIC_TEST_SEED = 0
SYNTHETIC_TEST_OPTIONS = dict(
    train_ids=6,
    test_ids=8,
    train_images=20,
    test_images=30,
    image_width=160,
    image_height=120,
    cuhk=dict(test_images=101),
)


@pytest.fixture(scope="session", autouse=True)
def annotation_cache_dir(tmp_path_factory):
    """The suite keeps its parsed annotation files in a folder of its own (never the user's
    ~/.cache), inherited by the command-line runs the tests start."""
    import os

    folder = tmp_path_factory.mktemp("annotation_cache")
    previous = os.environ.get("DDPS_CACHE_DIR")
    os.environ["DDPS_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DDPS_CACHE_DIR", None)
    else:
        os.environ["DDPS_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> pathlib.Path:
    """Root of a small synthetic world: ``root / "CUHK-SYSU"`` and ``root / "PRW"``."""
    from tools import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic.generate(str(root), seed=SYNTHETIC_TEST_SEED, **SYNTHETIC_TEST_OPTIONS)
    return root


@pytest.fixture(scope="session")
def synthetic_cuhk_root(synthetic_root) -> pathlib.Path:
    return synthetic_root / "CUHK-SYSU"


@pytest.fixture(scope="session")
def synthetic_prw_root(synthetic_root) -> pathlib.Path:
    return synthetic_root / "PRW"


@pytest.fixture(scope="session")
def synthetic_options() -> dict:
    """The options ``synthetic_root`` was generated with (seed under key ``seed``)."""
    return dict(SYNTHETIC_TEST_OPTIONS, seed=SYNTHETIC_TEST_SEED)
