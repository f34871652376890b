"""Sub-sentence rule, chat-template tokenisation and the span labels."""
import pytest
import torch
from PIL import Image

from sare_ds.data.samples import BadSampleError, Sample
from sare_ds.data.steps import StepComposer
from sare_ds.data.subsentence import fragments, object_span
from sare_ds.data.tokenize import IGNORE_INDEX, collate, tokenize_sample

PROMPT = "Describe the image."
IMG = Image.new("RGB", (40, 30), (10, 200, 30))


def test_object_span_takes_first_fragment_and_context_before_it():
    cap = "A dog sits on a bench, next to a cat; the cat sleeps. A car!"
    assert [cap[s:e] for s, e in fragments(cap)] == ["A dog sits on a bench", " next to a cat", " the cat sleeps", " A car"]
    assert object_span(cap, "cat") == ("A dog sits on a bench,", " next to a cat")
    assert object_span(cap, "car") == ("A dog sits on a bench, next to a cat; the cat sleeps.", " A car")
    assert object_span(cap, "bench") == ("", "A dog sits on a bench")
    assert object_span(cap, "do") is None  # whole words only


@pytest.mark.parametrize("kind", ["pos", "neg", "sent"])
def test_labels_cover_exactly_the_target(adapter, kind):
    context = "" if kind == "sent" else "The image shows a dog,"
    target = " a cat and a bird" if kind != "sent" else "The image shows a dog, a cat."
    s = Sample(IMG, PROMPT, context, target, kind, "cat", 30.0, "img-1")
    t = tokenize_sample(s, adapter, 512)
    tok = adapter.tokenizer
    labelled = t.labels != IGNORE_INDEX
    ids = t.input_ids[labelled]
    # Labels equal the input ids where they are set.
    assert torch.equal(t.labels[labelled], t.input_ids[labelled])
    # The labelled tokens are one contiguous run at the very end of the sequence.
    pos = labelled.nonzero().flatten()
    assert torch.equal(pos, torch.arange(pos[0], len(t.input_ids)))
    if kind == "sent":
        assert ids[-1].item() == tok.eos_token_id
        assert tok.decode(ids[:-1]) == target
    else:
        assert tok.eos_token_id not in ids.tolist()
        assert tok.decode(ids) == target
    # Everything before is prompt + context, unlabelled, and decodes to the rendered prefix.
    prefix = tok.decode(t.input_ids[: pos[0]][t.input_ids[: pos[0]] != adapter.image_token_id], skip_special_tokens=True)
    assert prefix.endswith(PROMPT + " ASSISTANT: " + context)
    # The image placeholder is expanded to the processor's count (16 for 32 px / patch 8).
    assert int((t.input_ids == adapter.image_token_id).sum()) == 16
    assert t.image["pixel_values"].shape == (1, 3, 32, 32)


def test_bad_samples_raise_named_errors(adapter):
    with pytest.raises(BadSampleError, match="empty target"):
        tokenize_sample(Sample(IMG, PROMPT, "A dog,", "   ", "neg", "cat", 10.0, "img-7"), adapter, 512)
    with pytest.raises(BadSampleError, match="img-8.*max_length"):
        tokenize_sample(Sample(IMG, PROMPT, "", "a cat", "pos", "cat", 40.0, "img-8"), adapter, 10)
    with pytest.raises(BadSampleError, match="kind"):
        tokenize_sample(Sample(IMG, PROMPT, "", "a cat", "maybe", "cat", 40.0, "img-9"), adapter, 512)
    with pytest.raises(BadSampleError, match="no image"):
        tokenize_sample(Sample(None, PROMPT, "", "a cat", "pos", "cat", 40.0, "img-10"), adapter, 512)


def test_collate_pads_right_and_keeps_kinds(adapter):
    a = tokenize_sample(Sample(IMG, PROMPT, "", "a cat", "pos", "cat", 40.0), adapter, 512)
    b = tokenize_sample(Sample(IMG, PROMPT, "A dog, a bird,", " a cat on a chair", "neg", "cat", 12.0), adapter, 512)
    batch = collate([a, b], pad_token_id=adapter.tokenizer.pad_token_id)
    n_a = len(a.input_ids)
    assert batch["input_ids"].shape == (2, max(n_a, len(b.input_ids)))
    assert batch["attention_mask"][0].sum() == n_a and (batch["labels"][0, n_a:] == IGNORE_INDEX).all()
    assert batch["kind"].tolist() == [0, 1] and batch["score"].tolist() == [40.0, 12.0]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


def test_step_composer_epoch_over_neg_and_determinism():
    data = {"pos": list(range(5)), "neg": list(range(100, 107)), "sent": [200, 201]}
    comp = StepComposer(data, {"pos": 1, "neg": 2, "sent": 1}, grad_accum_steps=1, epochs=1, seed=3)
    steps = list(comp)
    assert len(steps) == 3  # 7 neg // 2 per step
    negs = [x for s in steps for x in s[0]["neg"]]
    assert len(set(negs)) == 6  # each neg seen at most once per epoch
    assert steps == list(StepComposer(data, {"pos": 1, "neg": 2, "sent": 1}, 1, 1, 3))
    with pytest.raises(ValueError, match="data.sent_per_step"):
        StepComposer({"pos": [1], "neg": [2]}, {"pos": 1, "neg": 1, "sent": 1}, 1, 1, 0)
