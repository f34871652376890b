"""CLIP object scores on the 100 x cosine scale: EFUF's sliding-window local score and a global mode.

Local score (EFUF): an image whose longer side exceeds `max_side` px is first scaled down to it
(bounding its windows, hence memory: 1344 px -> at most 25 x 25 windows of 4 x 4 patches of 48 px);
then the image is resized so a grid of `patch` px patches fits it exactly
(each side rounded to the nearest whole number of patches, at least one window; so no pixel
is dropped and the aspect ratio changes by at most half a patch per side); windows of
`window x window` patches slide with a stride of one patch; every window is resized to the
CLIP input size and scored; each patch gets the mean score of the windows covering it, and
the object's score is the mean of its top-k patches.

Speed: all windows of an image are cut from one tensor and encoded once, whatever the number
of objects; windows of several images share CLIP batches; text embeddings are computed once
per distinct prompt and cached. The score is 100 * cos computed explicitly (it equals CLIP's
`logits_per_image` only when the learned logit scale is exactly 100).

    scorer = ClipScorer.from_config(cfg.clip)
    scores = scorer.score(images, [["dog", "frisbee"], ["cat"]])   # [[s_dog, s_frisbee], [s_cat]]
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sare_ds.config import ConfigError

# A tiny open_clip architecture for tests and the CPU quickstart (random weights; ~1.8M params,
# most of them the 49408-token embedding table of CLIP's tokenizer).
TINY_CLIP_NAME = "sare-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}


def register_tiny_clip() -> str:
    """Register TINY_CLIP_CONFIG with open_clip (idempotent) and return its model name."""
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        path = Path(tempfile.mkdtemp(prefix="sare-clip-")) / f"{TINY_CLIP_NAME}.json"
        path.write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(path)
    return TINY_CLIP_NAME


def resolve_clip_model(model: str) -> str:
    """clip.model -> open_clip model name. `sare-tiny-clip` and a path to an open_clip model-config JSON
    (a custom architecture, e.g. the toy CLIP's) are registered first; a JSON's name is its file stem.
    A stem open_clip already knows with another config is registered again, so this file's config wins."""
    import open_clip

    if model == TINY_CLIP_NAME:
        return register_tiny_clip()
    if not model.endswith(".json"):
        return model
    path = Path(model)
    fix = ("pass an existing open_clip model-config JSON with embed_dim, vision_cfg and text_cfg (e.g. the "
           "toy-clip.json that `python -m sare_ds.toy.clip OUT_DIR` writes) or an open_clip model name "
           "such as ViT-B-32")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"clip.model = {model!r} is invalid: cannot read it as an open_clip model config "
                          f"({type(e).__name__}: {e}). Fix: {fix}") from None
    if not (isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg"))):
        raise ConfigError(f"clip.model = {model!r} is invalid: the JSON lacks embed_dim / vision_cfg / text_cfg. "
                          f"Fix: {fix}")
    if open_clip.get_model_config(path.stem) != cfg:
        open_clip.add_model_config(path)
    return path.stem


def window_grid(width: int, height: int, patch: int, window: int) -> tuple[int, int]:
    """(patch columns, patch rows) of the resized image: nearest whole number of patches per side, at
    least one window."""
    return max(window, int(round(width / patch))), max(window, int(round(height / patch)))


def patch_scores_from_windows(window_scores: torch.Tensor, window: int) -> torch.Tensor:
    """[n_obj, rows-w+1, cols-w+1] window scores -> [n_obj, rows, cols] patch scores (mean over the
    windows covering each patch). A transposed convolution with a ones kernel spreads each window's
    score over its w x w patches; dividing by the spread of ones gives the mean."""
    x = window_scores[:, None].double()
    ones = torch.ones(1, 1, window, window, dtype=x.dtype)
    summed = F.conv_transpose2d(x, ones)
    covering = F.conv_transpose2d(torch.ones_like(x[:1]), ones)
    return (summed / covering)[:, 0]


class ClipScorer:
    """Object scores from any CLIP-like pair of encoders (open_clip in practice; stubs in tests)."""

    def __init__(self, encode_image: Callable[[torch.Tensor], torch.Tensor],
                 encode_text: Callable[[list[str]], torch.Tensor], input_size: int, mean, std, *,
                 mode: str = "local", patch_size: int = 48, window_patches: int = 4, top_k: int = 4,
                 prompt: str = "A photo containing {obj}.", batch_size: int = 256, device="cpu",
                 max_side: int = 0):
        self.encode_image, self.encode_text = encode_image, encode_text
        self.input_size = int(input_size)
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.mode, self.patch, self.window, self.top_k = mode, patch_size, window_patches, top_k
        self.prompt, self.batch_size = prompt, batch_size
        self.max_side = max_side  # 0: no bound
        self._text_cache: dict[str, torch.Tensor] = {}
        self.images_encoded = 0  # crops through the image tower (for the benchmark)

    @classmethod
    def from_config(cls, clip_cfg, device=None) -> "ClipScorer":
        import open_clip

        name = resolve_clip_model(clip_cfg.model)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Random weights (no `pretrained`) come from a fixed seed: a resumed run, or another rank, must
        # score with the same model as the chunks already written.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(name, pretrained=clip_cfg.pretrained or None, device=device)
        return cls.from_model(model, open_clip.get_tokenizer(name), clip_cfg, device)

    @classmethod
    def from_model(cls, model, tokenizer, clip_cfg, device="cpu") -> "ClipScorer":
        """A scorer around an open_clip model already in memory (from_config's second half; the toy CLIP
        scores with it while training)."""
        import open_clip

        model.eval()
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD

        def encode_text(texts: list[str]) -> torch.Tensor:
            return model.encode_text(tokenizer(texts).to(device))

        return cls(model.encode_image, encode_text, size, mean, std, mode=clip_cfg.mode,
                   patch_size=clip_cfg.patch_size, window_patches=clip_cfg.window_patches, top_k=clip_cfg.top_k,
                   prompt=clip_cfg.prompt, batch_size=clip_cfg.batch_size, device=device, max_side=clip_cfg.max_side)

    # -- embeddings ----------------------------------------------------------------------
    @torch.no_grad()
    def text_embeddings(self, objects: list[str]) -> torch.Tensor:
        """[n, D] unit-norm embeddings of the prompts for `objects` (cached per distinct string)."""
        new = [o for o in dict.fromkeys(objects) if o not in self._text_cache]
        if new:
            emb = F.normalize(self.encode_text([self.prompt.format(obj=o) for o in new]).float(), dim=-1).cpu()
            self._text_cache.update(zip(new, emb))
        return torch.stack([self._text_cache[o] for o in objects])

    @torch.no_grad()
    def _encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] crops in [0, 1] at the CLIP input size -> [N, D] unit-norm embeddings."""
        out = []
        for i in range(0, len(crops), self.batch_size):
            batch = ((crops[i:i + self.batch_size] - self.mean) / self.std).to(self.device)
            out.append(F.normalize(self.encode_image(batch).float(), dim=-1).cpu())
            self.images_encoded += len(batch)
        return torch.cat(out) if out else torch.zeros(0, 0)

    def _to_input_size(self, crops: torch.Tensor) -> torch.Tensor:
        # Bicubic with antialiasing, as PIL's resize in CLIP's own preprocessing.
        crops = F.interpolate(crops, size=(self.input_size, self.input_size), mode="bicubic",
                              antialias=True, align_corners=False)
        return crops.clamp_(0, 1)

    def windows(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """All windows of one image as [n_windows, 3, S, S] (row-major) and the (rows, cols) of windows."""
        width, height = image.width, image.height
        if self.max_side and max(width, height) > self.max_side:
            # Windows grow with the square of the side: bound it, or one large photo can exhaust memory.
            scale = self.max_side / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        cols, rows = window_grid(width, height, self.patch, self.window)
        resized = image.convert("RGB").resize((cols * self.patch, rows * self.patch), Image.BICUBIC)
        t = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        side = self.window * self.patch
        # unfold: [3, nr, nc, side, side]; stride = one patch.
        win = t.unfold(1, side, self.patch).unfold(2, side, self.patch)
        nr, nc = win.shape[1], win.shape[2]
        win = win.permute(1, 2, 0, 3, 4).reshape(nr * nc, 3, side, side)
        return self._to_input_size(win), (nr, nc)

    def whole(self, image: Image.Image) -> torch.Tensor:
        """[1, 3, S, S]: shorter side resized to S, centre crop (CLIP's standard preprocessing)."""
        w, h = image.size
        scale = self.input_size / min(w, h)
        nw, nh = max(self.input_size, round(w * scale)), max(self.input_size, round(h * scale))
        resized = image.convert("RGB").resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.input_size) // 2, (nh - self.input_size) // 2
        crop = resized.crop((left, top, left + self.input_size, top + self.input_size))
        return torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]

    # -- scores --------------------------------------------------------------------------
    def score(self, images: list[Image.Image], objects: list[list[str]]) -> list[list[float]]:
        """Scores of objects[i] in images[i]: one CLIP pass over all crops of all images."""
        if len(images) != len(objects):
            raise ValueError(f"score: {len(images)} images but {len(objects)} object lists; pass one list per image")
        if not images:
            return []
        crops, grids = [], []
        for img in images:
            if self.mode == "local":
                w, grid = self.windows(img)
            else:
                w, grid = self.whole(img), (1, 1)
            crops.append(w)
            grids.append(grid)
        emb = self._encode_crops(torch.cat(crops))
        out, offset = [], 0
        for (nr, nc), objs in zip(grids, objects):
            img_emb = emb[offset: offset + nr * nc]
            offset += nr * nc
            if not objs:
                out.append([])
                continue
            window_scores = 100.0 * (self.text_embeddings(objs) @ img_emb.T)  # [n_obj, n_windows]
            if self.mode == "global":
                out.append([float(s) for s in window_scores[:, 0]])
                continue
            patches = patch_scores_from_windows(window_scores.view(len(objs), nr, nc), self.window)
            k = min(self.top_k, patches[0].numel())
            top = patches.flatten(1).topk(k, dim=1).values.mean(1)
            out.append([float(s) for s in top])
        return out
