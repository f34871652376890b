"""The toy world: generated scenes, a tiny captioner and a tiny CLIP trained on them, on CPU.

See docs/toy_world.md. `sare_ds.toy.scenes` (scenes, captions, COCO files),
`sare_ds.toy.mllm` (the captioner), `sare_ds.toy.clip` (the CLIP), `sare_ds.toy.world`
(builds and caches both, with calibrated curation thresholds).
"""
