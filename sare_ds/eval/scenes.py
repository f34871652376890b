"""A COCO-format evaluation set of the generated scenes (the toy world / quickstart), and the
`eval_set.json` that names its files.

    paths = write_scene_eval_set("runs/eval-scenes", num_images=16, image_size=32, seed=1)
    # {'image_dir', 'instances', 'captions', 'pope': {'random': ...}}   (absolute, resolved)
    paths = read_eval_set("runs/eval-scenes/eval_set.json")             # the same, from any folder
    data = load_scene_eval_data("runs/eval-scenes/eval_set.json")      # EvalData of all its images
    eval_set = scene_eval_set_path("runs/eval-scenes", make=False)     # --scenes: missing -> an error

Images are drawn by sare_ds.data.synthetic (coloured shapes standing for COCO objects); the
instance file lists the drawn objects, the caption file two grounded reference captions per
image, and a POPE-style question file asks about every drawn object (yes) and as many
absent ones (no). The seed should differ from the training data's seed.

`eval_set.json` stores its paths relative to its own folder, so a scene set can be moved or read
from another working directory; files written before (absolute paths, or paths relative to the
folder the writer ran in) still load (`read_eval_set`: a relative path is looked up next to the
file first, then from the working directory).
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

from sare_ds.data.synthetic import caption_for, write_coco_scenes

EVAL_SET = "eval_set.json"
PATH_KEYS = ("image_dir", "instances", "captions")


class SceneSetError(FileNotFoundError):
    """--scenes names no scene eval set (and creating one was not asked for); the message names the fix."""


def relative_eval_set(paths: dict, folder: str | Path) -> dict:
    """`paths` (image_dir, instances, captions, pope: {split: file}) made relative to `folder` where
    they lie inside it (the form eval_set.json stores); other paths are kept absolute."""
    folder = Path(folder).resolve()

    def rel(p: str) -> str:
        q = Path(p).resolve()
        try:
            return q.relative_to(folder).as_posix()
        except ValueError:
            return str(q)

    out = {k: rel(paths[k]) for k in PATH_KEYS if k in paths}
    if paths.get("pope"):
        out["pope"] = {split: rel(f) for split, f in paths["pope"].items()}
    return out


def write_eval_set_file(folder: str | Path, paths: dict) -> Path:
    """Write `<folder>/eval_set.json` with paths relative to `folder` (`relative_eval_set`)."""
    path = Path(folder) / EVAL_SET
    path.write_text(json.dumps(relative_eval_set(paths, folder), indent=1))
    return path


def _resolve(value: str, folder: Path) -> str:
    p = Path(value)
    if p.is_absolute():
        return str(p)
    beside = folder / p
    if beside.exists():
        return str(beside.resolve())
    if p.exists():
        return str(p.resolve())  # an older file: relative to the folder its writer ran in
    return str(beside)  # missing either way: the error that follows names it next to eval_set.json


def read_eval_set(path: str | Path) -> dict:
    """The paths of an eval_set.json, absolute: relative ones are taken from the file's folder (what
    write_scene_eval_set stores), else, for files written before, from the working directory."""
    path = Path(path)
    if not path.is_file():
        raise SceneSetError(f"scene eval set {path} does not exist; fix: pass the folder of a scene eval set "
                            "(the one holding eval_set.json) to --scenes")
    fix = ("write the scene set again (`--scenes NEW_DIR --make-scenes` in launch/evaluate.py / launch/attack.py, "
           "or `sare_ds.eval.scenes.write_scene_eval_set`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"scene eval set {path} is not valid JSON ({e}); fix: {fix}") from None
    missing = [k for k in ("instances", "captions", "image_dir") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"scene eval set {path} lacks {missing} (it needs image_dir, instances, captions and "
                         f"optionally pope); fix: {fix}")
    folder = path.parent
    out = {k: _resolve(str(data[k]), folder) for k in PATH_KEYS}
    if data.get("pope"):
        out["pope"] = {split: _resolve(str(f), folder) for split, f in data["pope"].items()}
    return out


def load_scene_eval_data(path: str | Path, chair_mode: str = "reference"):
    """EvalData of every image of a scene eval set (`read_eval_set`'s resolved paths)."""
    from sare_ds.eval.coco import CocoTruth
    from sare_ds.eval.evaluate import EvalData
    from sare_ds.eval.images import all_images

    p = read_eval_set(path)
    truth = CocoTruth.from_files([p["instances"]], [p["captions"]], chair_mode)
    images = all_images(truth, "scene eval set: all images", str(path))
    return EvalData.from_paths([p["instances"]], [p["captions"]], p["image_dir"], p.get("pope"), images=images,
                               chair_mode=chair_mode)


def scene_eval_set_path(scenes: str | Path, make: bool) -> tuple[Path, bool]:
    """(eval_set.json of the folder `scenes`, whether it must be written). A folder without one is an
    error naming it, near names and the fix, unless `make` (the user asked for a new scene set)."""
    scenes = Path(scenes)
    eval_set = scenes / EVAL_SET
    if eval_set.is_file():
        return eval_set, False
    if make:
        return eval_set, True
    parent = scenes.parent if str(scenes.parent) else Path(".")
    near = []
    if parent.is_dir():
        near = difflib.get_close_matches(scenes.name, [p.name for p in parent.iterdir() if (p / EVAL_SET).is_file()],
                                         n=3, cutoff=0.6)
    what = ("exists but holds no eval_set.json" if scenes.is_dir() else "does not exist")
    hint = f" Did you mean {', '.join(str(parent / n) for n in near)}?" if near else ""
    raise SceneSetError(
        f"--scenes {scenes}: the folder {what}, so there is no scene eval set to evaluate on.{hint} Fix: pass "
        "the folder of an existing scene set (the quickstart's is runs/toy/scenes/eval), or add --make-scenes "
        f"to write a new one of --scene-images N generated images there")


def write_scene_eval_set(out_dir: str | Path, num_images: int = 16, image_size: int = 32, seed: int = 1) -> dict:
    """Draw a scene eval set into `out_dir`; returns its paths (as given; eval_set.json stores them
    relative to out_dir)."""
    out_dir = Path(out_dir)
    records = write_coco_scenes(out_dir, num_images, image_size, seed, name_format="scene_{:05d}.png")
    captions, questions = [], []
    for r in records:
        present, image_id, file_name = r["present"], r["image"]["id"], r["image"]["file_name"]
        captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption_for(present, None)})
        captions.append({"id": len(captions) + 1, "image_id": image_id,
                         "caption": "A picture of a " + " and a ".join(reversed(present)) + "."})
        absent = r["rng"].sample(r["absent"], len(present))
        for name, label in [(n, "yes") for n in present] + [(n, "no") for n in absent]:
            questions.append({"question_id": len(questions) + 1, "image": file_name,
                              "text": f"Is there a {name} in the image?", "label": label})
    images = [r["image"] for r in records]
    paths = {"image_dir": str(out_dir / "images"), "instances": str(out_dir / "instances.json"),
             "captions": str(out_dir / "captions.json"), "pope": {"random": str(out_dir / "pope_random.json")}}
    Path(paths["captions"]).write_text(json.dumps({"images": images, "annotations": captions}))
    Path(paths["pope"]["random"]).write_text("".join(json.dumps(q) + "\n" for q in questions))
    write_eval_set_file(out_dir, paths)
    return paths


# ------------------------------------------------------------------------------ the launchers' flags

def add_scene_arguments(ap) -> None:
    """--scenes / --make-scenes / --scene-images of launch/evaluate.py and launch/attack.py."""
    ap.add_argument("--scenes", help="folder of a scene eval set (its eval_set.json); a folder without one is an "
                                     "error unless --make-scenes (or --scene-images N) asks for a new set there")
    ap.add_argument("--make-scenes", action="store_true",
                    help="write a new generated scene eval set into --scenes if it holds none")
    ap.add_argument("--scene-images", type=int, default=None,
                    help="images of a newly written scene eval set (default 16; giving it asks for one, as "
                         "--make-scenes does)")


def scene_set_of_args(a) -> tuple[Path, bool]:
    """(eval_set.json of --scenes, whether to write it): checked before any process group or model, so a
    misspelled folder fails fast (`scene_eval_set_path`)."""
    return scene_eval_set_path(a.scenes, a.make_scenes or a.scene_images is not None)


def scene_data_of_args(a, eval_set: Path, make: bool, chair_mode: str):
    """Every rank: rank 0 writes the new set if asked, the others wait for it; then the EvalData."""
    from sare_ds.eval.distributed import rank_and_world

    rank, world = rank_and_world()
    if make and rank == 0:
        print(f"--scenes {a.scenes}: writing a new scene eval set of {a.scene_images or 16} images")
        write_scene_eval_set(a.scenes, a.scene_images or 16, seed=1)
    if world > 1:
        import torch.distributed

        torch.distributed.barrier()  # the other ranks read what rank 0 wrote
    return load_scene_eval_data(eval_set, chair_mode=chair_mode)
