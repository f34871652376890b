"""Evaluation protocols: a named, fixed evaluation setting read from a JSON data file.

    protocol = load_protocol("coco-chair-pope")    # sare_ds/resources/protocol_coco-chair-pope.json
    cfg = protocol.apply(EvalConfig(), changed={})  # the protocol's prompt, decoding, CHAIR mode ...
    protocol.images()                               # its image list (the 500 POPE images)

A protocol fixes what makes numbers comparable across papers: caption prompt, decoding, token
budget, images, CHAIR mode, POPE splits. The file is data (JSON, never executed); the whole
file is copied into every eval.json written under it, so a result names its setting.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from sare_ds.eval.images import POPE_IMAGE_LIST, ImageList, pope_image_list
from sare_ds.eval.pope import SPLITS
from sare_ds.objects import check_chair_mode


class ProtocolError(ValueError):
    """A protocol file is malformed, or a setting contradicts the protocol."""


@dataclass(frozen=True)
class Protocol:
    name: str
    data: dict
    """The file's content, as recorded in reports."""
    source: str = ""

    def settings(self) -> dict:
        """EvalConfig field -> value that the protocol fixes."""
        cap, pope = self.data["caption"], self.data["pope"]
        return {"caption_prompt": cap["prompt"], "num_beams": int(cap["num_beams"]),
                "max_new_tokens": int(cap["max_new_tokens"]), "chair_mode": cap["chair_mode"],
                "num_images": 0, "pope_limit": 0, "pope_prompt_suffix": pope["prompt_suffix"],
                "pope_max_new_tokens": int(pope["max_new_tokens"])}

    def apply(self, cfg, changed: dict):
        """cfg with the protocol's settings; `changed` (field -> value set by hand) must agree with them."""
        settings = self.settings()
        clashes = {k: (v, settings[k]) for k, v in changed.items() if k in settings and v != settings[k]}
        if clashes:
            listed = "; ".join(f"{k}={v!r} (protocol: {p!r})" for k, (v, p) in clashes.items())
            raise ProtocolError(f"protocol {self.name!r} fixes {listed}; drop those flags to run the protocol, "
                                "or drop --protocol to evaluate with other settings (then not comparable)")
        return replace(cfg, **settings)

    def images(self) -> ImageList:
        if self.data["caption"]["images"] != POPE_IMAGE_LIST:
            raise ProtocolError(f"protocol {self.name!r}: images {self.data['caption']['images']!r} is not a "
                                f"packaged list; the one packaged list is {POPE_IMAGE_LIST!r}")
        return pope_image_list()

    def to_json(self) -> dict:
        return {"name": self.name, "source": self.source, **self.data}


def load_protocol(name_or_path: str) -> Protocol:
    """A packaged protocol by name (sare_ds/resources/protocol_<name>.json) or a protocol JSON file."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text, source = path.read_text(), str(path)
    else:
        ref = resources.files("sare_ds") / "resources" / f"protocol_{name_or_path}.json"
        if not ref.is_file():
            raise ProtocolError(f"protocol {name_or_path!r}: no packaged protocol of that name and no such .json "
                                "file; the packaged one is `coco-chair-pope`")
        text, source = ref.read_text(), f"sare_ds/resources/protocol_{name_or_path}.json"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"{source}: not JSON ({e}); fix the file") from None
    for section, keys in (("caption", ("prompt", "num_beams", "max_new_tokens", "images", "chair_mode")),
                          ("pope", ("splits", "prompt_suffix", "max_new_tokens"))):
        missing = [k for k in keys if k not in data.get(section, {})]
        if missing:
            raise ProtocolError(f"{source}: `{section}` lacks {missing}; a protocol names all of {list(keys)}")
    check_chair_mode(data["caption"]["chair_mode"], f"{source}: caption.chair_mode")
    if data["caption"]["num_beams"] != 1 or data["caption"].get("decoding", "greedy") != "greedy":
        raise ProtocolError(f"{source}: only greedy decoding (num_beams 1) is supported; fix the file")
    unknown = [s for s in data["pope"]["splits"] if s not in SPLITS]
    if unknown:
        raise ProtocolError(f"{source}: POPE splits {unknown} are not packaged ({list(SPLITS)}); fix the file")
    return Protocol(data.get("name", path.stem), data, source)
