"""The launch scripts' way out (sare_ds.dist.run_main): the exit code is main's, a traceback is
printed on an exception, and nothing of the interpreter's teardown runs after it."""
from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import atexit, sys
from sare_ds.dist import run_main
atexit.register(lambda: print("interpreter teardown ran"))
def main():
    print("main ran", flush=False)  # left in the buffer: run_main must flush it
    {body}
run_main(main)
"""


@pytest.mark.parametrize("body, code, needle", [
    ("return None", 0, None),
    ("return 3", 3, None),
    ("raise SystemExit(2)", 2, None),
    ("raise SystemExit('usage: bad flag')", 1, "usage: bad flag"),
    ("raise ValueError('a bug, not a user error')", 1, "ValueError: a bug, not a user error"),
])
def test_run_main_leaves_with_mains_code(body, code, needle):
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(body=body)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "main ran" in proc.stdout  # flushed before os._exit
    assert "interpreter teardown ran" not in proc.stdout  # os._exit: no atexit, no gloo thread teardown
    if needle:
        assert needle in proc.stderr
