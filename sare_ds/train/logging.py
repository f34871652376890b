"""Run logging: metrics.jsonl, TensorBoard scalars and a tqdm progress bar (rank 0 only).

Scalars arrive as device tensors and are converted here, at the logging interval: the only
place the training loop waits for the device.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


class MetricLogger:
    def __init__(self, run_dir: Path, logging_cfg, total_steps: int, enabled: bool = True):
        self.enabled = enabled
        self.cfg = logging_cfg
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        self.bar = None
        if enabled and logging_cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float | torch.Tensor]) -> dict[str, float]:
        values = {k: float(v) for k, v in scalars.items()}  # host sync happens here
        if not self.enabled:
            return values
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in values.items() if k.startswith("loss/")})
        return values

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
