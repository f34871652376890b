"""The whole path, for every model family sare_ds has an adapter for, on a tiny random model of it.

Each registered adapter with a tiny builder (`MLLMAdapter.build_tiny`) gets the same checks, each
against a plain reference:
  - tokenisation: sare_ds's packed input_ids for a caption == the family processor's own
    `apply_chat_template(..., tokenize=True)` for the same conversation (image expanded by the processor);
  - packing: a SARE step on packed captions == the per-sample step (losses, updated weights);
  - distributed: SARE steps under ZeRO-3 on 2 CPU ranks (`deepspeed launch/train.py`, as a user starts it) ==
    the single-process run (2 micro-batches), losses and trained weights;
  - the HF export of the run reloads through `load_mllm` with exactly the trained weights;
  - generation for CHAIR and POPE (`evaluate_run` on generated scenes) and the sharpness probe.
Family-specific behaviour (tiling, refusals, LoRA targets) lives in tests/test_family_<family>.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sare_ds  # noqa: F401
from sare_ds.config import ModelConfig, load_config
from sare_ds.data.samples import Caption, Span
from sare_ds.data.synthetic import caption_corpus
from sare_ds.data.tokenize import tokenize_caption
from sare_ds.models import adapter as adapter_module
from sare_ds.models import load_mllm
from sare_ds.models.tiny import DEFAULT_CORPUS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 2


def families() -> list[str]:
    """Every registered family whose adapter can build a tiny model of itself."""
    out = []
    for name, cls in sorted(adapter_module._REGISTRY.items()):
        if name == cls.family and cls.build_tiny.__func__ is not adapter_module.MLLMAdapter.build_tiny.__func__:
            out.append(name)
    return out


FAMILIES = families()


def env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family name, tiny checkpoint directory)."""
    name = request.param
    out = adapter_module.adapter_class(name, "test").build_tiny(
        tmp_path_factory.mktemp(f"tiny-{name}"), seed=0, corpus=DEFAULT_CORPUS + caption_corpus())
    return name, Path(out)


def test_each_tiny_model_loads_as_its_own_family(family):
    name, model_dir = family
    assert load(model_dir).family == name


def load(model_dir) -> "adapter_module.MLLMAdapter":
    return load_mllm(ModelConfig(name_or_path=str(model_dir)))


def test_every_family_of_the_issue_has_a_tiny_model():
    expected = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision", "idefics3", "smolvlm",
                "internvl", "paligemma", "instructblip"}
    assert set(FAMILIES) >= expected, sorted(expected - set(FAMILIES))


def caption_of(image) -> Caption:
    text = "There is a red square next to a dog. A blue circle is on the left."
    a, b = text.index("a red square"), text.index("A blue circle")
    return Caption(image, "Describe the image.", text,
                   [Span(a, a + len("a red square"), "pos", "square", 33.0),
                    Span(b, b + len("A blue circle"), "neg", "circle", 14.0)], image_id="fam-1")


def processor_reference(adapter, caption, image) -> dict:
    """The family processor's own inputs for the conversation (prompt, then the caption as the answer), built
    the way its model card says: `apply_chat_template(tokenize=True)`, or for the two families without a chat
    template their processor's own prompt format."""
    if adapter.family == "paligemma":  # "<image>" + prompt, the answer as the training suffix (+ EOS)
        return adapter.processor(images=image, text="<image>" + caption.prompt, suffix=caption.caption,
                                 return_tensors="pt")
    if adapter.family == "instructblip":  # the prompt and answer as plain text; query positions in front
        ref = dict(adapter.processor(images=image, text=f"{caption.prompt} {caption.caption}", return_tensors="pt"))
        # The Q-Former reads the instruction only (InstructBLIP trains it on the instruction, never the answer).
        instruction = adapter.processor(images=image, text=caption.prompt, return_tensors="pt")
        ref.update({k: v for k, v in instruction.items() if k.startswith("qformer_")})
        return ref
    assert adapter.processor.chat_template is not None, f"{adapter.family}: no chat template and no reference here"
    messages = adapter.conversation(caption.prompt, caption.caption)
    messages[0]["content"] = [{"type": "image", "image": image} if c["type"] == "image" else c
                              for c in messages[0]["content"]]
    return adapter.processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")


@pytest.mark.parametrize("size", [(32, 32), (64, 40)])
def test_tokenisation_equals_the_processors_own(family, size):
    name, model_dir = family
    adapter = load(model_dir)
    image = Image.new("RGB", size, (200, 40, 40))
    caption = caption_of(image)
    item = tokenize_caption(caption, adapter, 4096)[0]
    ref = processor_reference(adapter, caption, image)
    ref_ids = ref["input_ids"][0].tolist()
    ours = item.input_ids.tolist()
    # sare_ds cuts the text after the response (end-of-turn strings carry no loss).
    assert ref_ids[:len(ours)] == ours, (name, ours[:40], ref_ids[:40])
    assert int((item.input_ids == adapter.image_token_id).sum()) == int(
        (ref["input_ids"] == adapter.image_token_id).sum()) > 0
    for key, value in item.image.items():
        assert torch.equal(value, ref[key]), key
    for key, value in item.token_tensors.items():  # e.g. PaliGemma's token_type_ids
        assert value.tolist() == ref[key][0, :len(ours)].tolist(), key


def test_fixed_sample_tokens_add_up_to_a_samples_length(family):
    """The planner's and the data report's arithmetic: fixed text + image positions + the answer's tokens."""
    from sare_ds.data.samples import Sample
    from sare_ds.data.tokenize import fixed_sample_tokens, tokenize_sample

    name, model_dir = family
    adapter = load(model_dir)
    answer = "A red square next to a dog."
    fixed = fixed_sample_tokens(adapter, "Describe the image.")
    image = Image.new("RGB", (336, 336))  # the first probe size: image positions = image_min or image_max
    n_image = adapter.image_inputs(image).num_image_tokens
    sample = tokenize_sample(Sample(image, "Describe the image.", "", answer, "pos"), adapter, 8192)
    answer_tokens = len(adapter.tokenizer(answer, add_special_tokens=False)["input_ids"])
    extra = len(sample.input_ids) - (fixed["text"] + n_image + answer_tokens)
    assert fixed["image_min"] <= n_image <= fixed["image_max"]
    assert 0 <= extra <= 2, (name, fixed, n_image, answer_tokens, len(sample.input_ids))  # a space / merged piece


def test_curation_captions_with_the_family_model(family, tmp_path):
    """Curation's captioning stage (`model_captioner`: batched generation) on images of two sizes."""
    from tests.test_curation import FakeScorer, config

    from sare_ds.curation.pipeline import curate

    _, model_dir = family
    images = tmp_path / "imgs"
    images.mkdir()
    for i, size in enumerate([(40, 40), (64, 40), (40, 40)]):
        Image.new("RGB", size, (i * 60, 50, 50)).save(images / f"{i:03d}.png")
    cfg = config(tmp_path, images, **{"model.name_or_path": model_dir, "caption.max_new_tokens": 6,
                                      "caption.batch_size": 2, "clip.mode": "global"})
    manifest = curate(cfg, scorer=FakeScorer({}))
    # A random tiny model rarely names a COCO object: every image is accounted for either way.
    assert manifest["images"]["input"] == 3
    assert manifest["images"]["curated"] + sum(manifest["skipped"].values()) == 3


def test_packed_step_equals_the_per_sample_step(family):
    from tests.test_packing import close, run_step  # the LLaVA test's reference loop, model-agnostic

    from sare_ds.data.synthetic import generate_captions

    _, model_dir = family
    caps = generate_captions(4, 32, "Describe the image.", seed=3)
    packed, m_packed, _ = run_step(model_dir, caps, "sare", packing=True, split=(2, 2))
    unpacked, m_unpacked, _ = run_step(model_dir, caps, "sare", packing=False, split=(2, 2))
    assert close(packed, unpacked, 1e-5)
    for k in m_packed:
        if k.startswith(("loss/", "sam/")):
            assert m_packed[k] == pytest.approx(m_unpacked[k], rel=1e-4, abs=1e-6), k


def train_args(model_dir, run_dir, *extra) -> list[str]:
    return ["--config", str(ROOT / "launch/configs/tiny_random.yaml"), f"model.name_or_path={model_dir}",
            f"output.run_dir={run_dir}", f"optim.max_steps={STEPS}", "data.source=synthetic", "data.num_images=8",
            "data.max_length=1024", "data.captions_per_step=1", "logging.progress_bar=false", "method.rho=0.5",
            *extra]


@pytest.fixture(scope="module")
def runs(family, tmp_path_factory):
    """The single-process reference (2 micro-batches a step) and ZeRO-3 on 2 ranks (1 each), SARE."""
    from sare_ds.train.trainer import train

    name, model_dir = family
    ref = tmp_path_factory.mktemp(f"ref-{name}")
    args = train_args(model_dir, ref, "optim.grad_accum_steps=2")
    train(load_config(args[1], args[2:]))
    z3 = tmp_path_factory.mktemp(f"z3-{name}")
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch/train.py"),
           *train_args(model_dir, z3, "distributed.ds_config=ds_configs/zero3_cpu_fp32.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return ref, z3


def metrics(run_dir) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_zero3_on_two_ranks_equals_the_single_process_run(runs):
    ref, z3 = runs
    a, b = metrics(ref), metrics(z3)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for k in ("loss/pos", "loss/neg", "loss/sent", "sam/grad_norm_neg", "sam/sharpness_gap"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-7), (k, x["step"])
    assert any("sam/grad_norm_neg" in r and r["sam/grad_norm_neg"] > 0 for r in a)  # SARE's ascent ran
    wa, wb = load_file(str(ref / "trainable.safetensors")), load_file(str(z3 / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        # (a tensor training left at zero in both runs, e.g. an unreached bias, compares as 0 / 0 otherwise)
        rel = ((wa[k].double() - wb[k].double()).norm() / wa[k].double().norm().clamp_min(1e-12)).item()
        # 1e-4: AdamW at lr 1e-3 turns the ranks' other fp32 summation order into update differences of a few
        # 1e-6 relative, and more on a large trainable set of near-zero gradients (InstructBLIP's Q-Former: up to
        # 1.6e-5 in one CI run, 2e-6 in another); a wrong gradient or a missed reduction is O(1).
        assert rel <= 1e-4, (k, rel)


def test_hf_export_reloads_with_the_trained_weights(family, runs):
    name, model_dir = family
    _, z3 = runs
    exported = load(z3 / "hf")
    assert exported.family == load(model_dir).family
    trained = load_file(str(z3 / "trainable.safetensors"))
    state = exported.model.state_dict()
    assert trained and all(torch.equal(state[k], v) for k, v in trained.items())
    base = load(model_dir).model.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in trained.items())  # training changed them


def test_generation_chair_and_pope_on_the_trained_model(family, runs, tmp_path):
    from sare_ds.eval.evaluate import EvalConfig, evaluate_run
    from sare_ds.eval.scenes import load_scene_eval_data, write_scene_eval_set

    _, z3 = runs
    write_scene_eval_set(tmp_path / "scenes", num_images=4, image_size=32, seed=1)
    data = load_scene_eval_data(tmp_path / "scenes" / "eval_set.json")
    result = evaluate_run(z3, data, cfg=EvalConfig(max_new_tokens=8, perplexity=False), out_dir=tmp_path / "eval",
                          name="run")
    captions = [json.loads(l) for l in (tmp_path / "eval" / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 4 and all(isinstance(c["caption"], str) for c in captions)
    # The metrics are those of the generated texts: CHAIR_S from the per-caption records, POPE's accuracy from
    # the parsed answers against the labels.
    assert result["captions"]["CHAIR_S"] == pytest.approx(sum(bool(c["hallucinated"]) for c in captions) / 4)
    answers = [json.loads(l) for l in (tmp_path / "eval" / "pope_random.jsonl").read_text().splitlines()]
    assert answers and all(isinstance(a["answer"], str) for a in answers)
    accuracy = sum(a["parsed"] == a["label"] for a in answers) / len(answers)
    assert result["pope"]["splits"]["random"]["accuracy"] == pytest.approx(accuracy)


def test_sharpness_probe(family):
    from sare_ds.data.synthetic import generate_samples
    from sare_ds.eval.probe import sharpness_probe

    _, model_dir = family
    adapter = load(model_dir)
    samples = [s for s in generate_samples(4, 32, "Describe the image.", seed=2) if s.kind == "neg"][:3]
    out = sharpness_probe(adapter, samples, rho=0.05, num_radii=3, num_random=1)
    assert out["num_samples"] == len(samples) and out["grad_norm"] > 0
    assert all(name in adapter.mapping_parameter_names() for name in out["trainable_tensors"])
    curve = out["gradient_direction"]
    assert all(torch.isfinite(torch.tensor(curve))) and curve[0] == pytest.approx(out["loss_neg_at_theta"], rel=1e-5)
    # L_neg = -NLL rises along its own gradient (ascent) at a small radius.
    assert curve[1] > curve[0]


@pytest.mark.parametrize("files, needle", [
    ({"config.json": '{"model_type": "mplug_owl2"}'}, "mplug_owl2"),
    ({"config.json": '{"model_type": "mplug-owl"}'}, "mplug_owl"),
    ({"pretrained_minigpt4_7b.pth": "", "minigpt4_eval.yaml": ""}, "LAVIS"),
    ({"config.json": '{"model_type": "internvl_chat"}'}, "-hf"),
])
def test_unsupported_published_layouts_are_refused_with_the_reason(tmp_path, files, needle):
    """The paper's other models (mPLUG-Owl, MiniGPT-4) and InternVL's remote-code layout: refused before any
    weight is read, saying why and what to train instead (docs/models.md)."""
    from sare_ds.models import UnknownModelLayoutError, resolve_adapter

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UnknownModelLayoutError, match="not supported by sare_ds") as e:
        resolve_adapter(ModelConfig(name_or_path=str(tmp_path)))
    assert needle in str(e.value) and "docs/models.md" in str(e.value) and "Fix:" in str(e.value)
