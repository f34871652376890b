"""The typed configuration tree of a curation run (EFUF stage 1, docs/method.md section 2).

Same conventions as `sare_ds.config` (whose helpers it reuses): a docstring under every
field, YAML + `section.field=value` overrides, validation errors that name the field, the
rule and the fix, and the resolved tree written next to the output.

    cfg = load_curation_config("curate.yaml", ["clip.mode=global", "split.t0=30"])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sare_ds.config import (
    EFUF_CAPTION_PROMPT,
    ConfigError,
    ModelConfig,
    _merge,
    _require,
    apply_overrides,
    dump_config,
)

INPUT_FORMATS = ("auto", "folder", "coco", "shards")
CAPTION_SOURCES = ("model", "annotations")
CLIP_MODES = ("local", "global")
OBJECT_TEXTS = ("word", "category")
IMAGE_FORMATS = ("png", "jpg")


@dataclass
class InputConfig:
    path: str = ""
    """Images to curate: a folder of images, the image folder of a COCO layout, or WebDataset shards of
    images (a .tar, a brace pattern like `imgs-{000000..000009}.tar`, or a folder of .tar files)."""
    format: str = "auto"
    """`folder`, `coco` (needs input.annotations), `shards`, or `auto` (coco if annotations are given,
    shards if the path names .tar files, else folder)."""
    annotations: str = ""
    """COCO instances JSON (`images` with `id`/`file_name`, `annotations` with `category_id`,
    `categories`); gives image ids and the present/absent labels used by calibration."""
    limit: int = 0
    """Curate at most this many images (0: all): the first N in the input's order, for every input
    format (shard inputs: the shards are counted in order and the last one used is cut)."""
    allow_remote: bool = False
    """Allow `pipe:` and URL (http://, s3://...) shard inputs; off so a typo cannot run a command."""


@dataclass
class CaptionConfig:
    source: str = "model"
    """`model`: the MLLM describes each image (EFUF). `annotations`: take captions from
    caption.captions_file (re-curating captions made elsewhere, or generated scenes)."""
    captions_file: str = ""
    """caption.source=annotations: COCO captions JSON (`annotations` with `image_id`, `caption`); the
    first caption of each image is used."""
    prompt: str = EFUF_CAPTION_PROMPT
    """Prompt the MLLM answers; stored with every sample (training renders it again)."""
    max_new_tokens: int = 256
    """Longest caption in generated tokens (EFUF's prompt asks for at least 100 words)."""
    do_sample: bool = False
    """Sample instead of greedy/beam decoding."""
    temperature: float = 1.0
    """Sampling temperature (caption.do_sample=true only)."""
    top_p: float = 1.0
    """Nucleus sampling mass (caption.do_sample=true only)."""
    num_beams: int = 1
    """Beam width (1: greedy)."""
    batch_size: int = 8
    """Images per generation batch."""
    seed: int = 0
    """Seed of sampled decoding (each chunk seeds with seed + chunk index, so a resumed run matches)."""


@dataclass
class ClipConfig:
    model: str = "ViT-B-32"
    """open_clip architecture name (EFUF: ViT-B/32), or the path of an open_clip model-config JSON (a
    custom architecture such as the toy world's `toy-clip.json`, registered under its file stem)."""
    pretrained: str = "openai"
    """open_clip pretrained tag or a local checkpoint file; empty string for random weights (tests)."""
    mode: str = "local"
    """`local`: EFUF's sliding-window score; `global`: one embedding of the whole (centre-cropped) image."""
    patch_size: int = 48
    """Local mode: side of a grid patch in pixels (EFUF: 48)."""
    window_patches: int = 4
    """Local mode: side of a window in patches (EFUF: 4, i.e. 192 px windows, stride one patch)."""
    top_k: int = 4
    """Local mode: an object's score is the mean of its top-k patch scores (EFUF: 4)."""
    prompt: str = "A photo containing {obj}."
    """Text prompt; `{obj}` is replaced by the object text."""
    object_text: str = "word"
    """What fills `{obj}`: `word` (the caption's own words for it, lower-cased, e.g. "puppies") or
    `category` (the COCO category, e.g. "dog")."""
    batch_size: int = 256
    """Image crops per CLIP forward (windows of several images are batched together)."""
    device: str = "auto"
    """`auto` (this rank's GPU if there is one, else CPU), `cpu` or `cuda:N`."""
    max_side: int = 1344
    """Local mode: an image whose longer side exceeds this many px is first scaled down to it (aspect
    kept), which bounds the windows per image and so the memory of scoring it (1344 px = 28 patches of
    48: at most 25 x 25 = 625 windows). 0: no bound (a 4000 px photo would make ~6,500 windows)."""


@dataclass
class SplitConfig:
    t0: float = 32.0
    """Presence threshold (100 x cosine): objects scoring above it give pos samples."""
    t1: float = 23.0
    """Hallucination threshold: objects scoring below it give neg samples."""
    t2: float = 27.5
    """A whole caption is a sent sample if its mean object score is above t2 and every object above t1."""
    exclusive_fragments: bool = False
    """Off (the method, docs/method.md section 2): every object scoring above t0 gives a pos sample, even
    when its fragment also names a hallucinated (neg) object. On (a deviation from EFUF): such a fragment
    is not also a pos target, so the same tokens are not both ascended and descended; the pos samples
    left out are counted under `dropped_candidates` (pos_fragment_names_neg_object)."""


@dataclass
class OutputConfig:
    dir: str = "runs/curated"
    """Output directory: caption shards `cap-{index:06d}.tar`, manifest.json, scores.png, progress in .chunks/."""
    images_per_chunk: int = 1000
    """Images per unit of work; each chunk writes one caption shard, so this sets the shard size and
    the work an interruption can lose (the stream deals captions, not whole shards, to its slots)."""
    image_format: str = "png"
    """Encoding of the image member: `png` (lossless) or `jpg`; source bytes already in that format are
    copied unchanged."""
    jpeg_quality: int = 95
    """JPEG quality when re-encoding (output.image_format=jpg)."""
    resume: bool = True
    """Keep chunks an earlier run with the same config finished; false starts over (deletes old shards)."""
    histogram_bins: int = 60
    """Bins of the score histogram (scores.png)."""


@dataclass
class CalibrationConfig:
    present_below_t1: float = 0.05
    """Proposed t1 is this quantile of present objects' scores (share of real objects that would be
    unlearned as hallucinations)."""
    absent_above_t0: float = 0.05
    """Proposed t0 is the (1 - this) quantile of absent objects' scores (share of hallucinations that
    would be trained as grounded)."""


@dataclass
class CurationConfig:
    input: InputConfig = field(default_factory=InputConfig)
    """What to curate."""
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    """How captions are made."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The MLLM that captions (caption.source=model); same fields as training's `model`."""
    clip: ClipConfig = field(default_factory=ClipConfig)
    """The CLIP model and how object scores are computed."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """Thresholds that turn scores into pos / neg spans and sent captions."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Shards, manifest, histogram."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """Proposing t0 / t1 for another CLIP model from labelled objects."""


def load_curation_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CurationConfig:
    """Defaults <- YAML file <- overrides, then validated."""
    cfg = CurationConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
        data = yaml.safe_load(path.read_text()) or {}
        try:
            _merge(cfg, data, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    apply_overrides(cfg, overrides or [])
    validate_curation(cfg)
    return cfg


def validate_curation(cfg: CurationConfig) -> None:
    i, c, k, s, o, cal = cfg.input, cfg.caption, cfg.clip, cfg.split, cfg.output, cfg.calibration
    _require(bool(i.path), "input.path", i.path, "must name the images to curate",
             "pass input.path=<image folder | COCO image folder | shards>")
    _require(i.format in INPUT_FORMATS, "input.format", i.format, f"must be one of {INPUT_FORMATS}", "use auto")
    if i.format == "coco":
        _require(bool(i.annotations), "input.annotations", i.annotations, "input.format=coco needs the instances JSON",
                 "pass input.annotations=<annotations/instances_*.json>")
    _require(i.limit >= 0, "input.limit", i.limit, "must be >= 0", "0 curates everything")
    _require(c.source in CAPTION_SOURCES, "caption.source", c.source, f"must be one of {CAPTION_SOURCES}",
             "use model (the MLLM captions) or annotations")
    if c.source == "annotations":
        _require(bool(c.captions_file), "caption.captions_file", c.captions_file,
                 "caption.source=annotations needs a COCO captions JSON", "pass caption.captions_file=<captions.json>")
    _require(c.max_new_tokens > 0, "caption.max_new_tokens", c.max_new_tokens, "must be > 0", "use 256")
    _require(c.batch_size > 0, "caption.batch_size", c.batch_size, "must be > 0", "use 8")
    _require(c.num_beams >= 1, "caption.num_beams", c.num_beams, "must be >= 1", "use 1 (greedy)")
    _require(c.temperature > 0, "caption.temperature", c.temperature, "must be > 0", "use 1.0")
    _require(0 < c.top_p <= 1, "caption.top_p", c.top_p, "must be in (0, 1]", "use 1.0")
    _require(k.mode in CLIP_MODES, "clip.mode", k.mode, f"must be one of {CLIP_MODES}", "use local (EFUF)")
    _require(k.patch_size > 0, "clip.patch_size", k.patch_size, "must be > 0", "use 48 (EFUF)")
    _require(k.window_patches > 0, "clip.window_patches", k.window_patches, "must be > 0", "use 4 (EFUF)")
    _require(k.top_k > 0, "clip.top_k", k.top_k, "must be > 0", "use 4 (EFUF)")
    _require("{obj}" in k.prompt, "clip.prompt", k.prompt, "must contain {obj}", "use 'A photo containing {obj}.'")
    _require(k.object_text in OBJECT_TEXTS, "clip.object_text", k.object_text, f"must be one of {OBJECT_TEXTS}",
             "use word")
    _require(k.batch_size > 0, "clip.batch_size", k.batch_size, "must be > 0", "use 256")
    _require(k.max_side == 0 or k.max_side >= k.patch_size * k.window_patches, "clip.max_side", k.max_side,
             f"must be 0 or at least one window (clip.patch_size x clip.window_patches = "
             f"{k.patch_size * k.window_patches} px)", "use 1344 (28 patches of 48 px), or 0 for no bound")
    _require(s.t1 <= s.t0, "split.t1", s.t1, f"must not exceed split.t0 = {s.t0}",
             "lower split.t1 or raise split.t0 (EFUF: 23 < 32)")
    _require(s.t1 <= s.t2, "split.t2", s.t2, f"must be >= split.t1 = {s.t1}", "EFUF: t2 = 27.5")
    _require(bool(o.dir), "output.dir", o.dir, "must name a directory", "pass output.dir=runs/curated")
    _require(o.images_per_chunk > 0, "output.images_per_chunk", o.images_per_chunk, "must be > 0", "use 1000")
    _require(o.image_format in IMAGE_FORMATS, "output.image_format", o.image_format,
             f"must be one of {IMAGE_FORMATS}", "use png")
    _require(1 <= o.jpeg_quality <= 100, "output.jpeg_quality", o.jpeg_quality, "must be in [1, 100]", "use 95")
    _require(o.histogram_bins > 0, "output.histogram_bins", o.histogram_bins, "must be > 0", "use 60")
    for name in ("present_below_t1", "absent_above_t0"):
        v = getattr(cal, name)
        _require(0 < v < 0.5, f"calibration.{name}", v, "must be in (0, 0.5)", "use 0.05")


def save_curation_config(cfg: CurationConfig, path: str | Path) -> None:
    Path(path).write_text(dump_config(cfg).replace("sare_ds configuration", "sare_ds curation configuration", 1))
