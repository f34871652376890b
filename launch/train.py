"""Train FT / EFUF / SARE from a YAML config with dotted overrides.

    python launch/train.py --config launch/configs/quickstart.yaml method.name=efuf optim.lr=2e-5

Only wires library parts together: sare_ds.config (the tree), sare_ds.train.trainer (the loop).
"""
import argparse
import logging

from sare_ds.config import load_config
from sare_ds.train.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (fields of sare_ds.config.TrainConfig)")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. method.rho=0.1")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg)
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    main()
