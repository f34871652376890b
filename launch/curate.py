"""Curate EFUF training data into WebDataset shards (one record per caption), calibrate thresholds
from a curated run, or convert an old per-kind curation directory to caption shards.

    python launch/curate.py [--config curate.yaml] input.path=<images> output.dir=runs/curated [field=value ...]
    torchrun --nproc_per_node 2 launch/curate.py ...        # chunks spread over the ranks; rank 0 writes
                                                            # the manifest once every rank's chunks are done
    python launch/curate.py calibrate runs/curated          # propose t0/t1/t2 (needs COCO annotations)
    python launch/curate.py convert OLD_DIR NEW_DIR         # pos/neg/sent-*.tar -> cap-*.tar + manifest
    python launch/curate.py --fields                        # every config field with its meaning

Only wires library parts together: sare_ds.curation.config (the tree), sare_ds.curation.pipeline
(the run), sare_ds.curation.calibrate, sare_ds.curation.convert. Fields and formats: docs/curation.md.
"""
import argparse
import dataclasses
import json
import logging
import sys

import sare_ds  # noqa: F401  (torchvision guard before open_clip / transformers)
from sare_ds.config import field_docs
from sare_ds.curation.config import CurationConfig, load_curation_config


def print_fields() -> None:
    root = CurationConfig()
    for section in dataclasses.fields(root):
        sub = getattr(root, section.name)
        docs = field_docs(type(sub))
        for f in dataclasses.fields(sub):
            print(f"{section.name}.{f.name} = {getattr(sub, f.name)!r}\n    {docs.get(f.name, '')}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if len(sys.argv) > 1 and sys.argv[1] == "calibrate":
        ap = argparse.ArgumentParser(prog="curate.py calibrate", description="Propose t0/t1/t2 from labelled scores.")
        ap.add_argument("run_dir", help="output.dir of a curation run of a COCO layout with annotations")
        ap.add_argument("--present-below-t1", type=float, default=0.05)
        ap.add_argument("--absent-above-t0", type=float, default=0.05)
        a = ap.parse_args(sys.argv[2:])
        from sare_ds.curation.calibrate import calibrate_dir

        result = calibrate_dir(a.run_dir, a.present_below_t1, a.absent_above_t0)
        print(json.dumps({k: result[k] for k in ("t0", "t1", "t2", "pos_precision", "neg_precision")}, indent=1))
        print(f"written: {a.run_dir}/calibration.json, {a.run_dir}/calibration.png")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "convert":
        ap = argparse.ArgumentParser(
            prog="curate.py convert",
            description="Write caption shards (cap-*.tar) from per-kind shards (pos/neg/sent-*.tar).")
        ap.add_argument("old_dir", help="output.dir of a curation run in the per-kind (samples) format")
        ap.add_argument("new_dir", help="new or empty directory for the caption shards and their manifest")
        a = ap.parse_args(sys.argv[2:])
        from sare_ds.curation.convert import convert_to_captions

        manifest = convert_to_captions(a.old_dir, a.new_dir)
        print(json.dumps({"counts": manifest["counts"], "converted_from": manifest["converted_from"],
                          "shards": len(manifest["shards"])}, indent=1))
        print(f"written: {a.new_dir}/manifest.json and {len(manifest['shards'])} caption shard(s) "
              f"({manifest['counts']['captions']} captions)")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (fields of sare_ds.curation.config.CurationConfig)")
    ap.add_argument("--fields", action="store_true", help="list every config field and exit")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. clip.mode=global")
    a = ap.parse_args()
    if a.fields:
        print_fields()
        return
    cfg = load_curation_config(a.config, a.overrides)
    from sare_ds.curation.pipeline import curate

    manifest = curate(cfg)
    if manifest is not None:
        print(json.dumps({"format": manifest["format"], "counts": manifest["counts"],
                          "nothing_to_train": manifest["nothing_to_train"], "skipped": manifest["skipped"],
                          "shards": len(manifest["shards"])}, indent=1))
        print(f"written: {cfg.output.dir}/manifest.json, {cfg.output.dir}/scores.png")
        if manifest.get("warning"):
            print(f"WARNING: {manifest['warning']}", file=sys.stderr)


if __name__ == "__main__":
    from sare_ds.dist import run_main

    # Tears the process groups down and leaves without the interpreter's teardown, which can
    # abort on gloo's threads after every file is written (sare_ds.dist.exit_process).
    run_main(main)
