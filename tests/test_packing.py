"""Packed captions: one forward per caption against the per-sample path it replaces.

References: the per-sample tokenisation (`tokenize_sample`, each span cut after itself) with the
full-vocabulary per-sample NLL (`per_sample_nll`), and plain per-sample loops.
"""
from __future__ import annotations

import pytest
import torch

from sare_ds.config import MethodConfig, ModelConfig
from sare_ds.data.samples import KIND_INDEX, KINDS, Caption, Span
from sare_ds.data.synthetic import generate_captions
from sare_ds.data.tokenize import (
    IGNORE_INDEX,
    collate,
    collate_captions,
    tokenize_caption,
    tokenize_sample,
)
from sare_ds.models import load_mllm, select_trainable
from sare_ds.train.losses import EFUF_NEG_SCORE_CEILING, chunked_span_sums, per_sample_nll, span_sums
from sare_ds.train.params import PlainParameterSpace
from sare_ds.train.step import UnlearningStep, output_head

PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def captions():
    caps = generate_captions(12, 32, PROMPT, seed=3)
    assert any(c.sent for c in caps) and any(s.kind == "neg" for c in caps for s in c.spans)
    return caps


def packed_sums(adapter, items, kinds=KINDS, keep_logits=True):
    b = collate_captions(items, adapter.tokenizer.pad_token_id, kinds)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    if keep_logits:
        logits = adapter.model(**inputs, logits_to_keep=b["keep"]).logits
    else:
        logits = adapter.model(**inputs).logits[:, b["keep"]]
    return span_sums(logits, b["targets"], b["weights"]), logits


def per_sample_sums(adapter, caption: Caption, score_weighting=False):
    """Per kind: the sum over the caption's samples of their span NLL (one forward per sample)."""
    out = torch.zeros(len(KINDS))
    for s in caption.unpack():
        t = tokenize_sample(s, adapter, 512)
        b = collate([t], adapter.tokenizer.pad_token_id)
        nll = per_sample_nll(adapter.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                           pixel_values=b["pixel_values"]).logits, b["labels"])[0]
        w = 1.0
        if score_weighting and s.kind == "pos":
            w = s.score
        elif score_weighting and s.kind == "neg":
            w = EFUF_NEG_SCORE_CEILING - s.score
        out[t.kind] += w * nll.detach()
    return out


@torch.no_grad()
def test_one_forward_gives_every_span_nll_of_the_per_sample_path(adapter, captions):
    for c in captions:
        [item] = tokenize_caption(c, adapter, 512)
        assert item.counts.tolist() == [c.kind_counts()[k] for k in KINDS]
        got, _ = packed_sums(adapter, [item])
        torch.testing.assert_close(got, per_sample_sums(adapter, c), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_a_batch_of_captions_sums_their_spans(adapter, captions):
    items = [tokenize_caption(c, adapter, 512)[0] for c in captions[:5]]
    got, logits = packed_sums(adapter, items)
    want = sum(per_sample_sums(adapter, c) for c in captions[:5])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # The LM head ran on the labelled positions only, not on the image and prompt tokens.
    assert logits.shape[1] < max(len(it.input_ids) for it in items) / 2


@torch.no_grad()
def test_labelled_only_head_equals_full_logits(adapter, captions):
    items = [tokenize_caption(c, adapter, 512)[0] for c in captions[:4]]
    kept, small = packed_sums(adapter, items, keep_logits=True)
    full, _ = packed_sums(adapter, items, keep_logits=False)
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_score_weighting_matches_efuf_per_sample(adapter, captions):
    for c in captions[:6]:
        [item] = tokenize_caption(c, adapter, 512, score_weighting=True)
        got, _ = packed_sums(adapter, [item])
        torch.testing.assert_close(got, per_sample_sums(adapter, c, score_weighting=True), rtol=1e-6, atol=1e-4)


def test_unpacked_view_is_the_per_sample_tokenisation(adapter, captions):
    for c in captions[:6]:
        seqs = tokenize_caption(c, adapter, 512, packing=False)
        refs = [tokenize_sample(s, adapter, 512) for s in c.unpack()]
        assert len(seqs) == len(refs)
        for got, ref in zip(seqs, refs):
            assert torch.equal(got.input_ids, ref.input_ids) and torch.equal(got.labels, ref.labels)
            assert got.counts[ref.kind] == 1 and got.counts.sum() == 1


def test_method_kinds_filter_spans_and_count_the_skip(adapter, captions):
    from sare_ds.data.samples import BadSampleError

    neg_only = next(c for c in captions if c.spans and not c.sent)
    neg_only = Caption(neg_only.image, PROMPT, neg_only.caption, [s for s in neg_only.spans if s.kind == "neg"][:1])
    [item] = tokenize_caption(neg_only, adapter, 512, kinds=KINDS)
    assert item.counts.tolist() == [0, 1, 0]
    with pytest.raises(BadSampleError) as e:  # fine-tuning reads pos and sent only
        tokenize_caption(neg_only, adapter, 512, kinds=("pos", "sent"))
    assert "no span of kinds" in e.value.reason


def test_spans_beyond_max_length_are_left_out_and_counted(adapter, captions):
    c = max(captions, key=lambda c: len(c.spans))
    [full] = tokenize_caption(c, adapter, 512)
    last_span = max(c.spans, key=lambda s: s.end)
    # Room for everything but the last span's final token.
    last_token = int((full.weights[KIND_INDEX[last_span.kind]] != 0).nonzero()[-1])
    [cut] = tokenize_caption(Caption(c.image, c.prompt, c.caption, c.spans), adapter, last_token)
    assert len(cut.input_ids) == last_token
    assert cut.counts.sum() == len(c.spans) - 1
    assert sum(cut.dropped.values()) == 1 and "data.max_length" in next(iter(cut.dropped))


def test_span_weights_are_one_per_span(adapter, captions):
    """Each span's token weights sum to 1 (its mean NLL), so counts are the denominators."""
    c = Caption(captions[0].image, PROMPT, "A dog, a cat and a bird.",
                [Span(0, 5, "pos", "dog"), Span(6, 24, "neg", "cat"), Span(6, 24, "pos", "cat")], sent=True)
    [item] = tokenize_caption(c, adapter, 512)
    assert item.weights.sum(1).tolist() == pytest.approx([2.0, 1.0, 1.0])
    assert item.counts.tolist() == [2, 1, 1]
    assert int(item.input_ids[-1]) == adapter.tokenizer.eos_token_id  # sent: EOS labelled
    assert item.weights[KIND_INDEX["sent"], -1] > 0 and item.labels[-1] != IGNORE_INDEX


# --------------------------------------------------------------------------------- the step

class SeparatePasses(PlainParameterSpace):
    """The ZeRO schedule (three passes, the direction in the gradient), on plain tensors."""

    separate_direction = False


class Lockstep(PlainParameterSpace):
    """Runs every pass on every micro-batch (weightless stand-ins), as ZeRO ranks do."""

    lockstep = True


def run_step(model_dir, captions, method, *, packing=True, split=(len,), space_cls=PlainParameterSpace, steps=1,
             head_chunks=8, **method_kw):
    """Weights after `steps` optimizer steps on `captions`, cut into micro-batches of `split` captions."""
    torch.manual_seed(0)
    adapter = load_mllm(ModelConfig(name_or_path=str(model_dir)))
    select_trainable(adapter, ModelConfig())
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    # SGD: the update is linear in the gradient, so the comparison measures the gradient (Adam's first
    # step is about lr * sign(g) and turns ulp-level differences of near-zero elements into lr-sized ones).
    space = space_cls(params, torch.optim.SGD(params, lr=0.1), None, 0.0)
    step = UnlearningStep(adapter.model, adapter.forward_inputs, space, MethodConfig(name=method, **method_kw),
                          device=torch.device("cpu"), dtype=torch.float32, pad_token_id=adapter.tokenizer.pad_token_id,
                          head_chunks=head_chunks)
    per_caption = [tokenize_caption(c, adapter, 512, packing=packing) for c in captions]
    forwards = []
    handle = adapter.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    metrics = None
    for _ in range(steps):
        micro, i = [], 0
        for n in split:
            micro.append([s for seqs in per_caption[i:i + n] for s in seqs])
            i += n
        metrics = step(micro)
    handle.remove()
    return torch.cat([p.detach().flatten() for p in params]), {k: float(v) for k, v in metrics.items()}, len(forwards)


def close(a, b, tol=1e-6):
    return ((a.double() - b.double()).norm() / b.double().norm()).item() <= tol


@pytest.mark.parametrize("method", ["ft", "efuf", "sare"])
def test_packed_step_equals_unpacked_step(tiny_model_dir, captions, method):
    caps = captions[:6]
    packed, m_packed, f_packed = run_step(tiny_model_dir, caps, method, packing=True, split=(3, 3))
    unpacked, m_unpacked, f_unpacked = run_step(tiny_model_dir, caps, method, packing=False, split=(3, 3))
    assert close(packed, unpacked)
    for k in m_packed:
        if k.startswith("loss/") or k.startswith("sam/"):
            assert m_packed[k] == pytest.approx(m_unpacked[k], rel=1e-5, abs=1e-6), k
    # Same number of forward calls (one per micro-batch and pass) but 1 sequence per caption instead of
    # one per span: the point of packing.
    assert f_packed == f_unpacked


@pytest.mark.parametrize("method", ["efuf", "sare"])
def test_micro_batch_split_does_not_change_the_objective(tiny_model_dir, captions, method):
    """Kind losses are means over the step's spans: 1 x 6 captions == 2 + 4 == 6 x 1 (a split with
    micro-batches holding no neg span included). Means of micro-batch means would differ here."""
    caps = captions[:6]
    whole, m_whole, _ = run_step(tiny_model_dir, caps, method, split=(6,))
    for split in ((2, 4), (1,) * 6):
        got, m, _ = run_step(tiny_model_dir, caps, method, split=split)
        assert close(got, whole), split
        assert m["loss/neg"] == pytest.approx(m_whole["loss/neg"], rel=1e-5)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-fused", "trainable-checkpointed"])
@pytest.mark.parametrize("chunks", [1, 3, 48, 100])
def test_chunked_head_equals_the_logits_in_one_piece(chunks, frozen):
    """chunked_span_sums == span_sums(head(hidden)): values and the gradients of the hidden states (and of a
    trainable head), fp32 1e-6, in 1 chunk, a few uneven ones, one per position, more chunks than
    positions (the last ones empty), for both ways: a frozen head (the fused function, gradients in the
    forward, at least MIN_FUSED_CHUNK positions a chunk) and a trainable one (checkpointed head calls,
    exactly `chunks` of them, recomputed in each backward). A second backward through the same graph
    (SARE's shared forward) gives the same gradients again."""
    g = torch.Generator().manual_seed(0)
    b, k, h, v = 2, 48, 16, 300
    hidden0 = torch.randn(b, k, h, generator=g)
    targets = torch.randint(0, v, (b, k), generator=g)
    targets[0, :3] = IGNORE_INDEX  # positions without a label (padding of the shorter caption)
    weights = torch.rand(b, len(KINDS), k, generator=g)
    weights[0, :, :3] = 0.0

    def run(fn):
        head = torch.nn.Linear(h, v, bias=True)
        init = torch.Generator().manual_seed(1)
        with torch.no_grad():
            head.weight.copy_(torch.randn(v, h, generator=init))
            head.bias.copy_(torch.randn(v, generator=init))
        head.requires_grad_(not frozen)
        hidden = hidden0.clone().requires_grad_()
        sums = fn(head, hidden)
        grads = lambda: [hidden.grad.clone()] + ([] if frozen else [head.weight.grad.clone(), head.bias.grad.clone()])
        sums.sum().backward(retain_graph=True)
        first = grads()
        (sums * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        return sums.detach(), first, grads()

    ref = run(lambda head, hidden: span_sums(head(hidden), targets, weights))
    calls = []

    def counted(head, hidden):
        head.register_forward_pre_hook(lambda *_: calls.append(1))
        return chunked_span_sums(head, hidden, targets, weights, chunks)

    got = run(counted)
    # The fused way never calls the module (F.linear on its weight); the checkpointed one calls it in the
    # forward and again in each of the two backwards, `chunks` times each.
    assert len(calls) == (0 if frozen else 3 * chunks)
    assert torch.allclose(got[0], ref[0], rtol=1e-6, atol=1e-6)
    for x, y in zip([*got[1], *got[2]], [*ref[1], *ref[2]]):
        assert close(x, y)


def test_chunked_head_step_equals_the_kept_logits_step(tiny_model_dir, captions):
    """A SARE step (shared forward: two backwards through the chunks) and an EFUF step with the head in
    5 chunks == the model's own head on the kept positions (head_chunks=0)."""
    caps = captions[:6]
    for method in ("sare", "efuf"):
        chunked, m_chunked, _ = run_step(tiny_model_dir, caps, method, split=(3, 3), head_chunks=5)
        whole, m_whole, _ = run_step(tiny_model_dir, caps, method, split=(3, 3), head_chunks=0)
        assert close(chunked, whole), method
        for k in m_whole:
            if k.startswith(("loss/", "sam/")):
                assert m_chunked[k] == pytest.approx(m_whole[k], rel=1e-5, abs=1e-7), (method, k)


def test_a_trainable_head_under_deepspeed_runs_in_one_piece(tiny_model_dir, caplog):
    """DeepSpeed reduces a trainable head's gradient in each chunk's backward and its first backward after
    zero_grad copies into the partitions: chunks would keep only the last one's. The step falls back to
    the model's own head in one piece, and says so."""
    adapter = load_mllm(ModelConfig(name_or_path=str(tiny_model_dir)))
    adapter.model.get_output_embeddings().weight.requires_grad_(True)

    class Engine(torch.nn.Module):  # what the step checks of a DeepSpeed engine
        def __init__(self, module):
            super().__init__()
            self.module = module

        def zero_optimization_stage(self):
            return 3

    params = [adapter.model.get_output_embeddings().weight]
    space = PlainParameterSpace(params, torch.optim.SGD(params, lr=0.1), None, 0.0)
    with caplog.at_level("WARNING"):
        step = UnlearningStep(Engine(adapter.model), adapter.forward_inputs, space, MethodConfig(name="efuf"),
                              device=torch.device("cpu"), dtype=torch.float32, pad_token_id=0, head_chunks=8)
    assert step.head_chunks == 0 and step.head is None
    assert "lm_head_chunks=8 ignored" in caplog.text
    # Without DeepSpeed a trainable head keeps its chunks (the checkpointed calls accumulate in .grad).
    plain = UnlearningStep(adapter.model, adapter.forward_inputs, space, MethodConfig(name="efuf"),
                           device=torch.device("cpu"), dtype=torch.float32, pad_token_id=0, head_chunks=8)
    assert plain.head_chunks == 8


def test_a_head_that_transforms_its_logits_is_refused():
    from types import SimpleNamespace

    class Capped(torch.nn.Module):
        config = SimpleNamespace(text_config=SimpleNamespace(final_logit_softcapping=30.0))

        def get_output_embeddings(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="lm_head_chunks=0"):
        output_head(Capped())
    for name, value in (("logit_scale", 0.0625), ("logits_scaling", 8.0)):
        class Scaled(Capped):
            config = SimpleNamespace(**{name: value})

        with pytest.raises(ValueError, match=f"scales its logits.*{name}.*lm_head_chunks=0"):
            output_head(Scaled())

    class Unscaled(Capped):
        config = SimpleNamespace(logit_scale=1.0)

    assert isinstance(output_head(Unscaled()), torch.nn.Linear)


def test_separate_passes_equal_the_shared_forward(tiny_model_dir, captions):
    caps = captions[:6]
    shared, m_shared, f_shared = run_step(tiny_model_dir, caps, "sare", split=(3, 3), steps=2)
    separate, m_sep, f_sep = run_step(tiny_model_dir, caps, "sare", split=(3, 3), steps=2, space_cls=SeparatePasses)
    assert close(shared, separate)
    for k in ("loss/neg", "loss/pos", "sam/grad_norm_neg", "sam/sharpness_gap", "train/grad_norm"):
        assert m_shared[k] == pytest.approx(m_sep[k], rel=1e-5, abs=1e-7), k
    assert f_shared == 2 * 2 * 2 and f_sep == 3 * 2 * 2  # forwards per micro-batch: 2 (shared) vs 3


def test_lockstep_runs_every_pass_and_changes_nothing(tiny_model_dir, captions):
    """A micro-batch without neg spans still forwards in the neg passes under lockstep (ZeRO ranks must
    all join each forward's parameter gathers), with zero weight: same update as skipping it."""
    no_neg = [c for c in captions if not any(s.kind == "neg" for s in c.spans)][:2]
    with_neg = [c for c in captions if any(s.kind == "neg" for s in c.spans)][:2]
    caps = no_neg + with_neg
    skipped, _, f_skip = run_step(tiny_model_dir, caps, "sare", split=(2, 2), space_cls=SeparatePasses)

    class LockstepSeparate(SeparatePasses):
        lockstep = True

    joined, _, f_join = run_step(tiny_model_dir, caps, "sare", split=(2, 2), space_cls=LockstepSeparate)
    assert close(joined, skipped)
    assert f_skip == 2 + 1 + 1 and f_join == 3 * 2  # cap x2, neg x1 each, vs every pass on every micro-batch


def test_a_step_without_neg_spans_does_not_perturb(tiny_model_dir, captions):
    """No neg span in the whole step: g = 0, so eps* = 0 and the update is the capability gradient's,
    in both schedules (the shared forward must not take the capability gradient for the direction)."""
    caps = [c for c in captions if not any(s.kind == "neg" for s in c.spans)][:3]
    ft, _, _ = run_step(tiny_model_dir, caps, "ft", split=(3,))
    for space_cls in (PlainParameterSpace, SeparatePasses):
        got, m, _ = run_step(tiny_model_dir, caps, "sare", split=(3,), space_cls=space_cls)
        assert m["sam/eps_norm"] == 0.0 and m["sam/grad_norm_neg"] == 0.0
        assert close(got, ft), space_cls.__name__


# ------------------------------------------------------------- a SentencePiece-style tokenizer

LONG_CAPTION = (
    "The image shows a busy street with several cars, a red bus and two people walking on the sidewalk. "
    "A dog is sitting near the bench; there is also a bicycle leaning against a tree. In the background, "
    "tall buildings line the road, and a traffic light stands at the corner: some birds fly above the trucks!")
LONG_OBJECTS = ("cars", "bus", "people", "dog", "bench", "bicycle", "tree", "buildings", "traffic light", "birds",
                "trucks")


@torch.no_grad()
def test_llama_layout_tokenizer_packed_equals_cut_but_at_boundary_tokens():
    """The preset's Llama-layout stand-in (Metaspace BPE, byte fallback): per span, the packed sequence
    labels the same tokens as the per-sample cut, except where a token merges the span's end with the
    text after it (the documented boundary rule); where the tokens agree the NLL agrees."""
    from PIL import Image

    from sare_ds.data.subsentence import object_span

    adapter = load_mllm(ModelConfig(name_or_path="preset:llava-1.5-7b-reduced"))  # random weights, 576 image tokens
    image = Image.new("RGB", (336, 336), (120, 30, 200))
    spans = []
    for i, name in enumerate(LONG_OBJECTS):
        context, target = object_span(LONG_CAPTION, name)
        spans.append(Span(len(context), len(context) + len(target), "neg" if i % 3 == 0 else "pos", name, 20.0))
    caption = Caption(image, PROMPT, LONG_CAPTION, spans, sent=True, sent_score=30.0)
    [packed] = tokenize_caption(caption, adapter, 4096)
    assert packed.counts.tolist() == [7, 4, 1]
    boundary, compared = 0, 0
    for span in spans:
        [one] = tokenize_caption(Caption(image, PROMPT, LONG_CAPTION, [span]), adapter, 4096)
        cut = tokenize_sample(Caption(image, PROMPT, LONG_CAPTION, [span]).unpack()[0], adapter, 4096)
        got, want = one.input_ids[one.labels != IGNORE_INDEX], cut.input_ids[cut.labels != IGNORE_INDEX]
        if not torch.equal(got, want):
            # Only the last labelled token may differ, and only by reaching past the span's end.
            assert torch.equal(got[:-1], want[:-1]) and len(got) == len(want), span
            boundary += 1
            continue
        sums, _ = packed_sums(adapter, [one])
        b = collate([cut], adapter.tokenizer.pad_token_id)
        ref = per_sample_nll(adapter.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                           pixel_values=b["pixel_values"]).logits, b["labels"])[0]
        torch.testing.assert_close(sums[KIND_INDEX[span.kind]], ref, rtol=1e-5, atol=1e-5)
        compared += 1
    # This vocabulary has no piece joining a word with the delimiter after it: no boundary token here.
    assert boundary == 0 and compared == len(spans)


def test_boundary_rule_a_token_reaching_past_the_span_belongs_to_it(adapter, captions):
    """A span ending inside a token: packed, the whole token is labelled (the token the model wrote);
    the per-sample cut tokenises the cut text and ends on another token there. Only that last token
    differs."""
    text = "A dog, a cat."
    span = Span(0, 4, "pos", "dog")  # "A do": ends inside "dog"
    c = Caption(captions[0].image, PROMPT, text, [span])
    [packed] = tokenize_caption(c, adapter, 512)
    cut = tokenize_sample(c.unpack()[0], adapter, 512)
    got = packed.input_ids[packed.labels != IGNORE_INDEX].tolist()
    want = cut.input_ids[cut.labels != IGNORE_INDEX].tolist()
    assert got != want and got[:-1] == want[:len(got) - 1]
    assert adapter.tokenizer.decode(got).strip().endswith("dog")
    assert packed.weights[KIND_INDEX["pos"]].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("space_cls", [PlainParameterSpace, SeparatePasses])
def test_lambda1_zero_still_reports_the_neg_loss_and_gap(tiny_model_dir, captions, space_cls):
    """lambda1 = 0 weighs the perturbed pass out of the update, but L_neg and the sharpness gap are
    still measured (the probe of the method), and the update is the capability gradient's."""
    caps = captions[:4]
    ft, _, _ = run_step(tiny_model_dir, caps, "ft", split=(2, 2))
    got, m, _ = run_step(tiny_model_dir, caps, "sare", split=(2, 2), lambda1=0.0, space_cls=space_cls)
    assert {"loss/neg", "sam/sharpness_gap"} <= set(m) and m["loss/neg"] < 0
    assert close(got, ft)
