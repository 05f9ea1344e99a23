"""utils.runtime_env: passive OpenMP waits, and glibc keeping freed memory in the process."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "DDPS_KEEP_FREED_MEMORY")


def _run(code, *args, env_update=None, unset=()):
    env = dict(os.environ)
    for k in unset:
        env.pop(k, None)
    env.update(env_update or {})
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


CHECK = """
import os, sys
sys.path.insert(0, {root!r})
import utils.runtime_env as r
# glibc cannot be asked for its settings: mallopt's return codes (1 = accepted) are the evidence
print(r.KEPT_FREED_MEMORY, os.environ["OMP_WAIT_POLICY"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_users_environment_wins():
    code = CHECK.format(root=ROOT)
    unset = MALLOC_VARS + ("OMP_WAIT_POLICY",)
    assert _run(code, unset=unset).split() == ["{-3:", "33554432,", "-1:", "2147483647,", "-2:", "1073741824}",
                                              "PASSIVE"]
    # the user's MALLOC_* settings (already applied by glibc) and OMP policy are left alone
    assert _run(code, unset=unset, env_update={"MALLOC_TOP_PAD_": "0", "OMP_WAIT_POLICY": "ACTIVE"}).split() == [
        "None", "ACTIVE"]
    assert _run(code, unset=unset, env_update={"DDPS_KEEP_FREED_MEMORY": "0"}).split() == ["None", "PASSIVE"]
