"""PaliGemma family adapter: PaliGemma (Gemma backbone) and PaliGemma 2 (Gemma-2 backbone).

Checkpoints covered (config `model_type` "paligemma" for all of them): google/paligemma-3b-mix-224
(and the other paligemma-3b-{pt,mix,ft}-{224,448,896}), google/paligemma2-3b-mix-448, google/paligemma2-10b-*
and the other paligemma2-{3b,10b,28b}-{pt,mix}-* checkpoints.

Mapping layers: `multi_modal_projector` (one linear layer, SigLIP width -> LLM width).

The sequence. PaliGemma has no chat template: its processor builds the model input itself,
    <image> x N  <bos>  prompt  "\\n"  |  response  <eos>
with N = (image_size / patch_size)^2 (256 at 224 px, 1024 at 448, 4096 at 896: every image is resized to the
checkpoint's square size, so N does not depend on the image) and `token_type_ids` 0 over the prefix (image,
BOS, prompt, "\\n") and 1 over the suffix (response, EOS). The forward turns token_type_ids into the prefix-LM
mask (`block_sequence_ids = 0 where token_type_ids == 0`): the prefix attends to itself bidirectionally, the
suffix causally. So:
- `render` with a response gives the whole sequence's text, `<image><bos>{prompt}\\n{response}` (sare_ds
  tokenises it with character offsets: the span labels); without a response (generation) it gives what the
  processor takes as `text`, `<image>{prompt}` (the processor inserts BOS after the image and appends "\\n").
- `expand_image` calls the processor exactly as PaliGemma fine-tuning does, `processor(images=image,
  text="<image>" + prompt, suffix=response)`, and checks that its input_ids (without the suffix's EOS, which
  sare_ds appends itself for `sent` samples) equal sare_ds's tokenisation outside the one `<image>`
  placeholder, and that its token_type_ids switch to 1 exactly where the response starts
  (ExpansionMismatchError otherwise: e.g. a tokenizer that merges "\\n" with the response's first characters
  would train on a sequence the processor never builds).
- `token_tensors` gives token_type_ids (0 before the response, 1 from it on, the appended EOS included): the
  processor's own for the same prompt and suffix. Zero padding when collated: padded positions are masked
  out by attention_mask, and the batch is only ever cut inside the suffix (after a labelled token), so the
  bidirectional prefix is always whole.

Refused at load: PaliGemma 2 with model.attn_implementation = sdpa or flash_attention_2 (transformers has no
SDPA attention for Gemma-2, whose attention soft-caps its logits, and PaliGemma drops flash attention because it
would lose the bidirectional prefix): the error names model.attn_implementation=eager. PaliGemma 2 also
soft-caps its final logits, which sare_ds's chunked LM head refuses (sare_ds/train/step.py output_head): train
it with model.lm_head_chunks=0.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sare_ds.models.adapter import (
    Expanded,
    ExpansionMismatchError,
    ImageInputs,
    MLLMAdapter,
    message_text,
    align_expansion,
    register_adapter,
)

IMAGE_TOKEN = "<image>"
# Gemma's special-token layout: <pad> 0, <eos> 1, <bos> 2, <unk> 3; the image token after the vocabulary.
TINY_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", IMAGE_TOKEN]


class UnsupportedAttentionError(ValueError):
    """An attention implementation the checkpoint's PaliGemma layout cannot run."""


def check_attention(config, attn_implementation: str | None, source: str) -> None:
    """Refuse, before any weight is read, an attention kernel the PaliGemma (2) forward cannot use."""
    text = getattr(getattr(config, "text_config", None), "model_type", "gemma")
    bad = {"flash_attention_2", "flash_attention_3"} | ({"sdpa"} if text == "gemma2" else set())
    if attn_implementation in bad:
        what = ("PaliGemma 2 (Gemma-2 backbone: its attention soft-caps the attention logits, which transformers' "
                "SDPA path does not do)" if attn_implementation == "sdpa" else
                "PaliGemma (flash attention drops the bidirectional image + prompt prefix)")
        raise UnsupportedAttentionError(
            f"{source}: model.attn_implementation = {attn_implementation!r} cannot run {what}. Nothing was loaded. "
            "Fix: set model.attn_implementation=eager" + (" (and model.lm_head_chunks=0: Gemma-2 also soft-caps "
                                                          "its final logits)" if text == "gemma2" else ""))


@register_adapter
class PaliGemmaAdapter(MLLMAdapter):
    family = "paligemma"
    model_types = ("paligemma",)
    mapping_patterns = (r"(^|\.)multi_modal_projector\.",)
    # PaliGemmaForConditionalGeneration: model.language_model.layers.N.{self_attn,mlp}.* (GemmaModel / Gemma2Model)
    language_model_pattern = r"(^|\.)language_model\."
    forward_keys = ("input_ids", "attention_mask", "pixel_values", "token_type_ids")

    @classmethod
    def _model_class(cls):
        from transformers import PaliGemmaForConditionalGeneration

        return PaliGemmaForConditionalGeneration

    @classmethod
    def check_config(cls, config, source: str, model_kwargs: dict) -> None:
        check_attention(config, model_kwargs.get("attn_implementation"), source)

    @property
    def placeholder_text(self) -> str:
        return IMAGE_TOKEN

    # -- text: no chat template; the processor's own layout -------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """With an assistant message: the whole sequence `<image><bos>{prompt}\\n{response}` (what sare_ds
        tokenises). Without one: the processor's `text` input `<image>{prompt}` (generation)."""
        prompt = "".join(message_text(m) for m in messages if m["role"] == "user")
        response = "".join(message_text(m) for m in messages if m["role"] == "assistant")
        users = sum(m["role"] == "user" for m in messages)
        if users != 1:
            raise ValueError(f"{self.source}: PaliGemma takes one image and one prompt (a single user turn); got "
                             f"{users} user turns. Fix: pass one prompt per image")
        if any(m["role"] == "assistant" for m in messages):
            return f"{IMAGE_TOKEN}{self.tokenizer.bos_token}{prompt}\n{response}"
        return f"{IMAGE_TOKEN}{prompt}"

    def add_special_tokens(self, text: str) -> bool:
        """Never: the processor inserts BOS after the image itself (and sets add_bos_token=False)."""
        return False

    # -- images --------------------------------------------------------------------------
    def _split(self, text: str, prompt: str, where: str) -> str:
        """The response part of a rendered training text (refused when it is not `<image><bos>{prompt}\\n...`)."""
        head = f"{IMAGE_TOKEN}{self.tokenizer.bos_token}{prompt}\n"
        if not text.startswith(head):
            raise ExpansionMismatchError(
                f"{where}: the text {text[:60]!r} is not PaliGemma's `<image><bos>prompt\\n response` layout for "
                f"the prompt {prompt!r}; fix: render the conversation with PaliGemmaAdapter.render")
        return text[len(head):]

    def processor_outputs(self, text: str, image, prompt: str) -> dict[str, torch.Tensor]:
        """The processor as PaliGemma fine-tuning calls it: prompt as `text`, the response as `suffix`."""
        response = self._split(text, prompt, self.source)
        return dict(self.processor(images=image, text=f"{IMAGE_TOKEN}{prompt}", suffix=response,
                                   return_tensors="pt"))

    def expand_image(self, text: str, ids: list[int], image, prompt: str, where: str = "") -> Expanded:
        where = where or self.source
        response = self._split(text, prompt, where)
        out = self.processor_outputs(text, image, prompt)
        truth = out["input_ids"][0].tolist()
        types = out["token_type_ids"][0].tolist()
        if truth[-1] != self.tokenizer.eos_token_id:
            raise ExpansionMismatchError(f"{where}: the PaliGemma processor did not end the suffix with EOS "
                                         f"({truth[-3:]}); fix: check the checkpoint's tokenizer (eos_token)")
        truth, types = truth[:-1], types[:-1]  # sare_ds appends EOS itself (sent samples)
        start, length = align_expansion(ids, truth, self.placeholder_token_id, where, self.tokenizer.decode)
        n_suffix = len(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        expected = [0] * (len(truth) - n_suffix) + [1] * n_suffix
        if types != expected:
            raise ExpansionMismatchError(
                f"{where}: the PaliGemma processor's token_type_ids (prefix 0, suffix 1) do not start the suffix "
                f"where the response's own tokens start ({types.index(1) if 1 in types else None} vs "
                f"{len(truth) - n_suffix}); the prefix-LM mask would differ from inference. Fix: check that the "
                "tokenizer does not merge the prompt's final newline with the response")
        tensors = {k: v for k, v in out.items() if k not in self.processor_text_keys and k != "labels"}
        return Expanded(truth, start, length, tensors)

    def image_inputs(self, image) -> ImageInputs:
        out = self.processor(images=image, text=IMAGE_TOKEN, return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        n = ids.count(self.image_token_id)
        tensors = {k: v for k, v in out.items() if k not in self.processor_text_keys and k != "labels"}
        return ImageInputs(tensors, n, [self.image_token_id] * n)

    def token_tensors(self, ids: list[int], response_start: int) -> dict[str, list[int]]:
        """token_type_ids: 0 over the prefix (image, BOS, prompt, newline), 1 from the response on (the prefix-LM
        mask of the forward; the processor's own for suffix=response)."""
        return {"token_type_ids": [0] * response_start + [1] * (len(ids) - response_start)}

    # -- tiny ----------------------------------------------------------------------------
    @classmethod
    def build_tiny(cls, out_dir, *, seed: int = 0, corpus: list[str] | None = None, gemma2: bool = False):
        """A tiny random PaliGemma (SigLIP 32 px, patch 8: 16 image tokens; Gemma 2 layers, hidden 64) with
        PaliGemma's processor (Gemma special-token layout, the 1,152 <locNNNN>/<segNNN> tokens the processor
        adds, no chat template). gemma2=True: a PaliGemma 2 layout (Gemma-2 backbone, logit soft-capping)."""
        from transformers import (
            Gemma2Config,
            GemmaConfig,
            PaliGemmaConfig,
            PaliGemmaForConditionalGeneration,
            PaliGemmaProcessor,
            SiglipImageProcessor,
            SiglipVisionConfig,
        )

        from sare_ds.models.tiny import save_tiny, tiny_corpus, train_tokenizer

        corpus = tiny_corpus(corpus)
        out_dir = Path(out_dir)
        image_size, patch_size, hidden = 32, 8, 64
        n_image = (image_size // patch_size) ** 2
        tokenizer = train_tokenizer(list(corpus), 600, special_tokens=TINY_SPECIAL_TOKENS, bos="<bos>", eos="<eos>",
                                    pad="<pad>", unk="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN},
                                    chat_template=None, add_bos=True)
        tokenizer.chat_template = None
        image_processor = SiglipImageProcessor(
            size={"height": image_size, "width": image_size}, resample=3, do_normalize=True,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], image_seq_length=n_image)
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds loc/seg tokens
        vocab = len(tokenizer)
        text_cls = Gemma2Config if gemma2 else GemmaConfig
        extra = {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                 "query_pre_attn_scalar": 16} if gemma2 else {}
        text = text_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **extra)
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=image_size, patch_size=patch_size, vision_use_head=False)
        config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
                                 vocab_size=vocab, projection_dim=hidden, hidden_size=hidden)
        torch.manual_seed(seed)
        model = PaliGemmaForConditionalGeneration(config)
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            setattr(model.generation_config, key, getattr(tokenizer, key))
        return save_tiny(out_dir, model, processor, family=cls.family, seed=seed)
