"""Evaluate one model: captions (CHAIR, BLEU, perplexity, length, throughput) and POPE.

    data = EvalData.from_paths(instances=[...], captions=[...], image_dir="val2014")   # the 500 POPE images
    result = evaluate_model(adapter, data, EvalConfig())            # CHAIR mode reference
    evaluate_run("runs/toy/runs/sare", EvalData.from_eval_set("runs/toy/scenes/eval/eval_set.json"))

The captioned images are a fixed list (sare_ds.eval.images): by default the 500 val2014 images
of the shipped POPE files, or any list of COCO ids; a scene evaluation set captions all its
images. Every result records the list, the CHAIR mode and the protocol (if one was used).
Images are spread over ranks when torch.distributed is initialised (see distributed.py);
every rank returns the same full result, rank 0 writes the files.
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sare_ds.config import EFUF_CAPTION_PROMPT
from sare_ds.eval.chair import chair
from sare_ds.eval.coco import CocoTruth, load_image
from sare_ds.eval.distributed import distributed_map, rank_and_world
from sare_ds.eval.images import ImageList, all_images, pope_image_list
from sare_ds.eval.pope import load_questions, mean_over_splits, parse_answer, pope_metrics
from sare_ds.eval.quality import bleu, mean_length, perplexity_from_sums, token_nll_sums
from sare_ds.models.generate import generate_responses
from sare_ds.objects import check_chair_mode


@dataclass
class EvalConfig:
    caption_prompt: str = EFUF_CAPTION_PROMPT
    """Prompt of the captions CHAIR and BLEU score (EFUF's evaluation prompt)."""
    chair_mode: str = "reference"
    """CHAIR's object extraction: `reference` (the published script, comparable with published numbers) or
    `corrected` (sare_ds's fixes; NOT comparable, reported under its own name). See docs/evaluation.md."""
    num_images: int = 0
    """Quick looks only: caption the first N images of the image list (0: the whole list, as protocols do).
    Which images are captioned is the image list's business (EvalData.images, --images FILE)."""
    max_new_tokens: int = 128
    """Longest generated caption in tokens (EFUF-style long captions need 512 for 100+ words)."""
    batch_size: int = 8
    """Images per generate call."""
    num_beams: int = 1
    """Beam width (1: greedy)."""
    pope_limit: int = 0
    """Questions per POPE split (0: all 3000)."""
    pope_prompt_suffix: str = ""
    """Appended to each POPE question (LLaVA-1.5's own eval adds " Answer the question using a single word or phrase.")."""
    pope_max_new_tokens: int = 16
    """Longest POPE answer in tokens (only the first sentence is parsed)."""
    perplexity: bool = True
    """Report the perplexity of the reference captions under the model."""
    synced_gpus: bool = False
    """ZeRO-3: every rank joins every forward (the model is sharded across ranks)."""


@dataclass
class EvalData:
    truth: CocoTruth | None = None
    """Ground truth and reference captions (None: no caption evaluation)."""
    image_dir: Path | None = None
    """Folder of the captioned images."""
    pope_files: dict = field(default_factory=dict)
    """POPE split -> question file (empty: no POPE)."""
    pope_image_dir: Path | None = None
    """Folder of the POPE images (default: image_dir)."""

    @property
    def images(self) -> ImageList | None:
        """The captioned images (the ground truth's image list)."""
        return self.truth.image_list if self.truth is not None else None

    @classmethod
    def from_paths(cls, instances=(), captions=(), image_dir=None, pope_files=None, pope_image_dir=None,
                   images: ImageList | None = None, chair_mode: str = "reference") -> "EvalData":
        """COCO-format files; `images` None: the 500 images of the shipped POPE files (POPE_IMAGE_LIST)."""
        truth = CocoTruth.from_files(list(instances), list(captions), chair_mode) if (instances or captions) else None
        if truth is not None and image_dir is None:
            raise ValueError("EvalData: annotation files given without image_dir; pass the folder of the images")
        if truth is not None:
            truth = truth.restricted_to(images if images is not None else pope_image_list())
        return cls(truth, Path(image_dir) if image_dir else None, {k: Path(v) for k, v in (pope_files or {}).items()},
                   Path(pope_image_dir) if pope_image_dir else (Path(image_dir) if image_dir else None))

    @classmethod
    def from_eval_set(cls, path: str | Path, chair_mode: str = "reference") -> "EvalData":
        """The eval_set.json written by sare_ds.eval.scenes.write_scene_eval_set: all of its images (paths
        relative to the file's folder; older files with absolute or cwd-relative paths still load)."""
        from sare_ds.eval.scenes import load_scene_eval_data

        return load_scene_eval_data(path, chair_mode)

    def with_chair_mode(self, mode: str) -> "EvalData":
        """The same data with ground truth found by CHAIR mode `mode`'s extractor."""
        return self if self.truth is None else replace(self, truth=self.truth.for_mode(mode))


def generate_captions(adapter, data: EvalData, cfg: EvalConfig, prompt: str | None = None) -> tuple[list[dict], dict]:
    """[{"image_id", "prompt", "caption"}] over the evaluation images, and throughput numbers."""
    items = [(image_id, str(path)) for image_id, path in data.truth.image_paths(data.image_dir, cfg.num_images)]
    prompt = cfg.caption_prompt if prompt is None else prompt
    return generate_for_items(adapter, [(i, p, prompt) for i, p in items], cfg)


def generate_for_items(adapter, items: list[tuple], cfg: EvalConfig) -> tuple[list[dict], dict]:
    """items: (image_id, image path, prompt); generation spread over ranks, results in order."""
    def run(chunk):
        images = [load_image(path) for _, path, _ in chunk]
        return generate_responses(adapter, images, [p for _, _, p in chunk], max_new_tokens=cfg.max_new_tokens,
                                  num_beams=cfg.num_beams, batch_size=cfg.batch_size, synced_gpus=cfg.synced_gpus)

    start = time.perf_counter()
    texts = distributed_map(run, items, synced=cfg.synced_gpus)
    seconds = time.perf_counter() - start
    tokens = sum(len(adapter.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    records = [{"image_id": i, "prompt": p, "caption": t} for (i, _, p), t in zip(items, texts)]
    return records, {"seconds": seconds, "captions_per_s": len(texts) / seconds if seconds else 0.0,
                     "tokens_per_s": tokens / seconds if seconds else 0.0, "generated_tokens": tokens}


def caption_metrics(records: list[dict], data: EvalData, chair_mode: str | None = None) -> dict:
    """CHAIR (in `chair_mode`, default the ground truth's), BLEU and mean length of generated captions."""
    truth = data.truth.for_mode(chair_mode) if chair_mode else data.truth
    scores = chair(records, truth)
    refs = [data.truth.captions.get(r["image_id"], []) for r in records]
    return {**{k: v for k, v in scores.items() if k != "captions"},
            **bleu([r["caption"] for r in records], refs),
            "mean_length_words": mean_length([r["caption"] for r in records]),
            "per_caption": scores["captions"]}


def reference_perplexity(adapter, data: EvalData, cfg: EvalConfig) -> dict:
    """Perplexity of each image's first reference caption as the answer to the caption prompt."""
    items = [(str(path), data.truth.captions[i][0]) for i, path in data.truth.image_paths(data.image_dir, cfg.num_images)
             if data.truth.captions.get(i)]

    def run(chunk):
        return token_nll_sums(adapter, [load_image(p) for p, _ in chunk], cfg.caption_prompt,
                              [t for _, t in chunk], batch_size=cfg.batch_size, synced_gpus=cfg.synced_gpus)

    pooled = perplexity_from_sums(distributed_map(run, items, synced=cfg.synced_gpus))
    return {"perplexity": pooled["perplexity"], "perplexity_tokens": pooled["tokens"]}


def pope_eval(adapter, data: EvalData, cfg: EvalConfig) -> dict:
    """Per split: metrics and answers; plus the mean over splits."""
    per_split, answers = {}, {}
    for split, path in data.pope_files.items():
        questions = load_questions(path, cfg.pope_limit)

        def run(chunk):
            cache: OrderedDict = OrderedDict()
            out = []
            # Slices keep memory bounded (3000 questions on 500 images), and every rank of a
            # synced run has the same number of slices because shares are padded equal.
            step = cfg.batch_size * 4
            for lo in range(0, len(chunk), step):
                part = chunk[lo:lo + step]
                images = []
                for q in part:
                    if q["image"] not in cache:
                        cache[q["image"]] = load_image(data.pope_image_dir / q["image"])
                        if len(cache) > 64:
                            cache.popitem(last=False)
                    images.append(cache[q["image"]])
                out += generate_responses(adapter, images, [q["text"] + cfg.pope_prompt_suffix for q in part],
                                          max_new_tokens=cfg.pope_max_new_tokens, batch_size=cfg.batch_size,
                                          synced_gpus=cfg.synced_gpus)
            return out

        replies = distributed_map(run, questions, synced=cfg.synced_gpus)
        predictions = [parse_answer(r) for r in replies]
        per_split[split] = pope_metrics(predictions, [q["label"] for q in questions])
        answers[split] = [{"question_id": q["question_id"], "image": q["image"], "text": q["text"],
                           "label": q["label"], "answer": r, "parsed": p}
                          for q, r, p in zip(questions, replies, predictions)]
    return {"splits": per_split, "mean": mean_over_splits(per_split), "answers": answers}


def evaluate_model(adapter, data: EvalData, cfg: EvalConfig | None = None, protocol=None) -> dict:
    """All metrics of one model; per-item records under "per_caption" and "pope"/"answers".

    The result records the CHAIR mode, the image list and the protocol (a sare_ds.eval.protocol
    Protocol, or None for hand-picked settings).
    """
    cfg = cfg or EvalConfig()
    check_chair_mode(cfg.chair_mode, "EvalConfig.chair_mode")
    data = data.with_chair_mode(cfg.chair_mode)
    result: dict = {"config": asdict(cfg), "chair_mode": cfg.chair_mode,
                    "protocol": protocol.to_json() if protocol is not None else None,
                    "images": dict(data.images.to_json(), limit=cfg.num_images) if data.images else None}
    if data.truth is not None:
        records, speed = generate_captions(adapter, data, cfg)
        result["captions"] = {**caption_metrics(records, data), **speed}
        if cfg.perplexity:
            result["captions"].update(reference_perplexity(adapter, data, cfg))
    if data.pope_files:
        result["pope"] = pope_eval(adapter, data, cfg)
    return result


def chair_column(metric: str, mode: str) -> str:
    """Table column of a CHAIR metric: plain in mode reference, suffixed in mode corrected, so a table
    never puts a corrected number under a published-comparable heading."""
    return metric if mode == "reference" else f"{metric} ({mode})"


def summary_row(result: dict) -> dict:
    """The headline numbers of an evaluate_model result (percentages where papers use them)."""
    row = {}
    cap = result.get("captions")
    if cap:
        mode = cap.get("chair_mode", "reference")
        row.update({chair_column("CHAIR_S", mode): 100 * cap["CHAIR_S"], chair_column("CHAIR_I", mode): 100 * cap["CHAIR_I"],
                    chair_column("recall", mode): 100 * cap["recall"],
                    "BLEU-1": 100 * cap["BLEU-1"], "BLEU-2": 100 * cap["BLEU-2"], "BLEU-4": 100 * cap["BLEU-4"],
                    "length": cap["mean_length_words"], "tokens/s": cap["tokens_per_s"]})
        if "perplexity" in cap:
            row["PPL"] = cap["perplexity"]
    pope = result.get("pope")
    if pope and pope["mean"]:
        row.update({"POPE acc": 100 * pope["mean"]["accuracy"], "POPE F1": 100 * pope["mean"]["f1"],
                    "POPE yes": 100 * pope["mean"]["yes_ratio"]})
    return row


def markdown_table(rows: dict[str, dict], digits: int = 2) -> str:
    """One Markdown table: a row per name, a column per key (union, first-seen order)."""
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for name, row in rows.items():
        cells = [f"{row[c]:.{digits}f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_evaluation(result: dict, out_dir: str | Path, name: str = "model") -> Path:
    """eval.json (metrics), captions.jsonl (per caption), pope_<split>.jsonl (answers), eval.md; rank 0 only."""
    out_dir = Path(out_dir)
    if rank_and_world()[0] != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(result, default=str))
    per_caption = slim.get("captions", {}).pop("per_caption", [])
    answers = slim.get("pope", {}).pop("answers", {})
    (out_dir / "eval.json").write_text(json.dumps(slim, indent=1))
    (out_dir / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per_caption))
    for split, rows in answers.items():
        (out_dir / f"pope_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = [f"# Evaluation of {name}", "", markdown_table({name: summary_row(result)}), ""]
    text.append(describe_setting(result))
    for split, m in result.get("pope", {}).get("splits", {}).items():
        text.append(f"- POPE {split}: accuracy {100 * m['accuracy']:.2f}, precision {100 * m['precision']:.2f}, "
                    f"recall {100 * m['recall']:.2f}, F1 {100 * m['f1']:.2f}, yes {100 * m['yes_ratio']:.2f} "
                    f"({m['num_questions']} questions)")
    (out_dir / "eval.md").write_text("\n".join(text) + "\n")
    return out_dir


def describe_setting(result: dict) -> str:
    """One Markdown paragraph: protocol, CHAIR mode and images of a result."""
    protocol = result.get("protocol")
    lines = [f"- Protocol: {protocol['name']} ({protocol.get('source', '')})" if protocol else
             "- Protocol: none (settings in eval.json `config`; compare only with results of the same settings)"]
    mode = result.get("chair_mode", "reference")
    lines.append(f"- CHAIR mode: {mode}" + (" (the published CHAIR script; comparable with published numbers)"
                                             if mode == "reference" else
                                             " (sare_ds's corrections; NOT comparable with published CHAIR numbers)"))
    images = result.get("images")
    if images:
        limit = images.get("limit") or 0
        lines.append(f"- Images: {images['name']} ({images['count']} images, {images['source']})"
                     + (f"; only the first {limit} captioned (quick look, not the protocol)" if limit else "")
                     + "; the ids are in eval.json `images`")
    return "\n".join(lines) + "\n"


def evaluate_run(run_dir: str | Path | None, data: EvalData, *, cfg: EvalConfig | None = None,
                 base: str | None = None, out_dir: str | Path | None = None, name: str | None = None,
                 protocol=None) -> dict:
    """Load base + the run's trainable weights, evaluate, write <run_dir>/eval (or out_dir); return the result."""
    import torch

    from sare_ds.eval.weights import load_method_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = cfg or EvalConfig()
    # synced_gpus means the model is sharded across ranks: load it under ZeRO-3.
    adapter = load_method_model(run_dir, base=base, device=device, zero3=cfg.synced_gpus)
    result = evaluate_model(adapter, data, cfg, protocol)
    target = Path(out_dir) if out_dir else Path(run_dir or ".") / "eval"
    write_evaluation(result, target, name or (Path(run_dir).name if run_dir else "base"))
    return result
