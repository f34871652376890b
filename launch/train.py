"""Train FT / EFUF / SARE from a YAML config with dotted overrides.

    # one process, no DeepSpeed
    python launch/train.py --config launch/configs/tiny_random.yaml method.name=efuf
    # DeepSpeed ZeRO-3, any launcher
    deepspeed --num_gpus 8 launch/train.py --config my.yaml distributed.ds_config=ds_configs/zero3_bf16.json
    torchrun --nproc_per_node 2 launch/train.py --config my.yaml distributed.ds_config=...
    mpirun -np 16 --hostfile hosts python launch/train.py --config my.yaml distributed.ds_config=...
    # continue an interrupted run
    deepspeed ... launch/train.py --config my.yaml ... --resume

Only wires library parts together: sare_ds.config (the tree), sare_ds.train.trainer (the loop).
"""
import argparse
import logging
import os

import torch

# DeepSpeed picks its accelerator at import; on a machine without GPUs that is the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

from sare_ds.config import load_config  # noqa: E402
from sare_ds.dist import shutdown  # noqa: E402
from sare_ds.train.trainer import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (fields of sare_ds.config.TrainConfig)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (output.resume=true)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. method.rho=0.1")
    args = ap.parse_intermixed_args()  # `--resume` may come after the overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides + (["output.resume=true"] if args.resume else []))
    run_dir = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {run_dir}")
    shutdown()


if __name__ == "__main__":
    main()
