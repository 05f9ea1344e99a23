"""Every command's --help speaks to users: each default stated once (no "(default: None)" next to
the real default), no internal references (issue, SPEC section, budget, target)."""
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

COMMANDS = ["train_ddps.py", "demo.py", "tools/quickstart.py", "tools/export.py", "tools/convert_checkpoint.py",
            "tools/reproduce_table.py", "tools/make_synthetic.py", "tools/benchmark.py", "tools/bench_eval.py",
            "tools/bench_eval_e2e.py", "tools/bench_export.py", "tools/bench_batched_inference.py",
            "tools/index_gallery.py", "tools/search.py", "tools/bench_index.py"]
INTERNAL = re.compile(r"\bissue\b|\bSPEC\b|\bbudget\b|\btarget\b|\bsession\b", re.IGNORECASE)


# one interpreter prints every --help (runpy, as `python FILE --help` would), one torch import
_PRINT_HELPS = """
import contextlib, io, json, runpy, sys
out = {}
for command in sys.argv[1:]:
    sys.argv = [command, "--help"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            runpy.run_path(command, run_name="__main__")
        except SystemExit:
            pass
    out[command] = buffer.getvalue()
print(json.dumps(out))
"""


def test_help_texts_state_defaults_once_and_speak_to_users():
    import json

    result = subprocess.run([sys.executable, "-c", _PRINT_HELPS, *COMMANDS], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    helps = json.loads(result.stdout.strip().splitlines()[-1])
    for command in COMMANDS:
        text = helps[command]
        assert "usage:" in text, command
        assert "(default: None)" not in text, command
        assert not re.search(r"\(default [^)]*\) \(default", text), command
        found = INTERNAL.findall(text)
        assert not found, (command, found)
