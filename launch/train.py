"""Train FT / EFUF / SARE from a YAML config with dotted overrides.

    # one process, no DeepSpeed
    python launch/train.py --config launch/configs/tiny_random.yaml method.name=efuf
    # DeepSpeed ZeRO-3, any launcher (--deepspeed FILE is distributed.ds_config=FILE)
    deepspeed --num_gpus 8 launch/train.py --config launch/configs/llava15_7b_sare.yaml
    deepspeed --num_gpus 8 launch/train.py --config my.yaml --deepspeed ds_configs/zero3_bf16.json
    torchrun --nproc_per_node 2 launch/train.py --config my.yaml distributed.ds_config=...
    mpirun -np 16 --hostfile hosts python launch/train.py --config my.yaml distributed.ds_config=...
    # continue an interrupted run
    deepspeed ... launch/train.py --config my.yaml ... --resume

Only wires library parts together: sare_ds.config (the tree), sare_ds.train.trainer (the loop).
"""
import argparse
import logging
import os
import sys

import torch

# DeepSpeed picks its accelerator at import; on a machine without GPUs that is the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import sare_ds  # noqa: E402,F401  (torchvision guard before transformers)
from sare_ds.config import ConfigError, TrainConfig, field_docs, load_config  # noqa: E402
from sare_ds.dist import exit_process, launcher_rank, shutdown  # noqa: E402


def _epilog() -> str:
    from sare_ds.models.presets import describe

    sections = "\n".join(f"  {name:<12} {doc}" for name, doc in field_docs(TrainConfig).items())
    return (f"config sections (set as section.field=value; every field: docs/config.md):\n{sections}\n\n"
            f"model presets (model.name_or_path=..., true shapes, random weights; plan: launch/plan.py):\n"
            f"{describe()}\n")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, epilog=_epilog(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (fields of sare_ds.config.TrainConfig; see docs/config.md)")
    ap.add_argument("--deepspeed", "--deepspeed_config", "--deepspeed-config", dest="ds_config", metavar="FILE",
                    help="DeepSpeed JSON: the same as distributed.ds_config=FILE (HF / LLaVA recipe convention)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (output.resume=true)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. method.rho=0.1")
    args = ap.parse_intermixed_args(argv)  # `--resume` may come after the overrides
    if args.ds_config is not None:
        clash = [o for o in args.overrides if o.split("=", 1)[0].strip() == "distributed.ds_config"]
        if clash and clash[-1].split("=", 1)[1] != args.ds_config:
            ap.error(f"--deepspeed {args.ds_config} and the override {clash[-1]} name different DeepSpeed configs; "
                     "pass one of them")
        args.overrides = args.overrides + [f"distributed.ds_config={args.ds_config}"]
    if args.resume:
        args.overrides = args.overrides + ["output.resume=true"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from sare_ds.data.samples import BadSampleError
    from sare_ds.data.shards import CorruptShardError, RemoteSourceError
    from sare_ds.data.stream import NotEnoughShardsError, ShardFormatError
    from sare_ds.models import NoTrainableParametersError, UnknownModelLayoutError, WeightsMismatchError
    from sare_ds.models.presets import PresetError

    user_errors = (ConfigError, PresetError, UnknownModelLayoutError, WeightsMismatchError,
                   NoTrainableParametersError, BadSampleError, CorruptShardError, RemoteSourceError,
                   NotEnoughShardsError, ShardFormatError, FileExistsError, FileNotFoundError)
    try:
        cfg = load_config(args.config, args.overrides)
        from sare_ds.train.trainer import train

        run_dir = train(cfg)
    except user_errors as e:
        # A mistake in the input, not a bug: one line naming the input, the rule and the fix (every rank
        # meets the same one; rank 0 says it).
        if launcher_rank() == 0:
            print(f"launch/train.py: error: {e}", file=sys.stderr)
        return 2
    if launcher_rank() == 0:
        print(f"run directory: {run_dir}")
    shutdown()
    return 0


if __name__ == "__main__":
    code = main()
    # main() has torn the process groups down and every file is written: leave without the
    # interpreter's teardown, which can abort on gloo's threads (sare_ds.dist.exit_process).
    exit_process(code)
