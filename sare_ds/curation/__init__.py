"""EFUF curation without human labels (docs/method.md section 2, docs/curation.md).

  config          the curation config tree (input, caption, model, clip, split, output, calibration)
  inputs          image folder / COCO layout / WebDataset shards -> deterministic chunks of items
  scoring         CLIP scores (100 x cosine): EFUF's sliding-window local score and a global mode
  split           caption + object scores -> pos / neg spans (character offsets) and the sent flag
  pipeline        the run: chunks over ranks, caption shards (sare_ds.data.shards), resume, manifest, histogram
  convert         an old per-kind curation directory -> caption shards (`launch/curate.py convert`)
  calibrate       propose t0 / t1 / t2 for another CLIP from present / absent score distributions
  synthetic_coco  the 6-shape generated scenes as a COCO-style folder (tests, benchmark)
  benchmark       throughput figures: curation images/s, window-reuse speed-up, stream samples/s

Entry point: `python launch/curate.py --help`.
"""
