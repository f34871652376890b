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


def test_deepspeed_cpu_runs_leave_no_shared_memory(tiny_model_dir, tmp_path):
    """DeepSpeed's CPU all-reduce op creates a /dev/shm buffer per rank and never unlinks it; a run
    through launch/train.py must not leave it behind (a CI session had accumulated 20 GB of them)."""
    import os
    import socket
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = set(os.listdir("/dev/shm"))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
         str(root / "launch/train.py"), "--config", str(root / "launch/configs/tiny_random.yaml"),
         f"model.name_or_path={tiny_model_dir}", f"output.run_dir={tmp_path / 'run'}", "data.source=synthetic",
         "data.num_images=8", "data.captions_per_step=1", "optim.max_steps=1", "output.export_hf=false",
         "logging.progress_bar=false", "distributed.ds_config=ds_configs/zero3_cpu_fp32.json"],
        cwd=root, capture_output=True, text=True, timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    left = [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("deepspeed_allreduce_buffer")]
    assert left == []
