"""InstructBLIP family adapter, decoder-only language models (Vicuna).

Checkpoints covered (config `model_type` "instructblip"): Salesforce/instructblip-vicuna-7b and
Salesforce/instructblip-vicuna-13b. Refused: Salesforce/instructblip-flan-t5-xl / -xxl (same model_type, but
`use_decoder_only_language_model` is False: a FlanT5 encoder-decoder), see `EncoderDecoderLanguageModelError`.

Mapping layers (the paper-style set: the Q-Former and the projection into the LLM): `qformer` (the whole
Q-Former, its word embeddings for the instruction included), `query_tokens`, `language_projection`.

The sequence. InstructBLIP has no chat template: the processor tokenises the text for the LLM (BOS + text) and
puts `num_query_tokens` image tokens IN FRONT of BOS (32 for the Vicuna checkpoints, whatever the image size:
the Q-Former always outputs that many queries), and tokenises the text a second time with the Q-Former's own
BERT WordPiece tokenizer (`qformer_input_ids`, `qformer_attention_mask`: the instruction the Q-Former reads).
- `render` with a response gives `<image>{prompt} {response}` (the placeholder marks where sare_ds's sequence
  holds the image; the response follows the prompt after a space, as LAVIS's training concatenates the
  prompt's tokens with the separately tokenised answer's). Without a response (generation) it gives the bare
  prompt, which is what the processor takes as `text`. The placeholder is written `<image>` or `<image> ` as
  the checkpoint's tokenizer needs for the text after it to tokenise exactly as it does at the start of a
  sequence (a SentencePiece "first"-scheme tokenizer such as Llama's adds its word-start marker only there).
- `processor_outputs` calls the processor on the PROMPT only: the Q-Former sees the instruction, never the
  response (as at generation, and as in LAVIS). `expand_image` tokenises the whole text through the processor
  for the LLM ids and checks them: `[image] x N, BOS, text...` must equal sare_ds's `BOS, <image>, text...`
  with the placeholder moved before BOS and expanded (ExpansionMismatchError otherwise).
  Expanded.start is the placeholder's index in sare_ds's ids (1, after BOS; 0 for a tokenizer that adds no
  BOS): BOS and the image positions all carry no characters, so tokenize.py's offset bookkeeping stays exact
  while the ids are the processor's.
- Per image: pixel_values [1, 3, H, W], qformer_input_ids / qformer_attention_mask [1, L] (zero-padded to the
  batch's longest when collated: 0 is BERT's [PAD] and a masked position).

Dropout is switched off in the model the adapter holds (the Q-Former's hidden and attention dropout are 0.1 in
the published configs; the config itself is left as published, so an export keeps it): a SARE step compares
losses of one function at theta and theta + eps, the step runs the model in train mode, and the ZeRO-3 and
packed-vs-per-sample parities need the same forward every time.

The forward has no `logits_to_keep` (sare_ds then computes every position's logits and picks the labelled
ones: the same NLL; model.lm_head_chunks does not apply).
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
    UnknownModelLayoutError,
    register_adapter,
)

IMAGE_TOKEN = "<image>"
DECODER_ONLY_CHECKPOINTS = ("Salesforce/instructblip-vicuna-7b", "Salesforce/instructblip-vicuna-13b")


class EncoderDecoderLanguageModelError(UnknownModelLayoutError):
    """An InstructBLIP checkpoint whose language model is an encoder-decoder (FlanT5)."""


def check_decoder_only(config, source: str) -> None:
    """Refuse an InstructBLIP config whose language model is not decoder-only (the FlanT5 variants)."""
    if getattr(config, "use_decoder_only_language_model", True):
        return
    text = getattr(getattr(config, "text_config", None), "model_type", "?")
    raise EncoderDecoderLanguageModelError(
        f"{source}: this InstructBLIP checkpoint's language model is the encoder-decoder `{text}` "
        "(use_decoder_only_language_model = False, e.g. Salesforce/instructblip-flan-t5-xl). sare_ds supports "
        "InstructBLIP with a decoder-only LLM only: it scores every span of a caption in one causal forward over "
        "image + prompt + response, while a T5 decoder sees the image and prompt only through its encoder and the "
        "response through separate decoder inputs. Nothing was loaded. Fix: use a decoder-only checkpoint "
        f"({', '.join(DECODER_ONLY_CHECKPOINTS)}).")


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout of `model` to 0 (nn.Dropout modules and attention modules' float `attention_dropout`);
    returns how many were non-zero."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p, changed = 0.0, changed + 1
        p = getattr(module, "attention_dropout", None)
        if isinstance(p, float) and p:
            module.attention_dropout, changed = 0.0, changed + 1
    return changed


@register_adapter
class InstructBlipAdapter(MLLMAdapter):
    family = "instructblip"
    model_types = ("instructblip",)
    mapping_patterns = (r"(^|\.)qformer\.", r"(^|\.)query_tokens$", r"(^|\.)language_projection\.")
    # InstructBlipForConditionalGeneration.language_model is the LlamaForCausalLM: language_model.model.layers.N...
    language_model_pattern = r"(^|\.)language_model\."
    forward_keys = ("input_ids", "attention_mask", "pixel_values", "qformer_input_ids", "qformer_attention_mask")

    def __init__(self, model, processor, source, loading=None):
        super().__init__(model, processor, source, loading)
        disable_dropout(model)

    @classmethod
    def _model_class(cls):
        from transformers import InstructBlipForConditionalGeneration

        return InstructBlipForConditionalGeneration

    @classmethod
    def check_config(cls, config, source: str, model_kwargs: dict) -> None:
        check_decoder_only(config, source)  # encoder-decoder (FlanT5) LLMs refused before any weight is read

    @property
    def placeholder_text(self) -> str:
        return IMAGE_TOKEN

    # -- text ----------------------------------------------------------------------------
    @property
    def _placeholder_prefix(self) -> str:
        """`<image>` or `<image> `: whichever makes the text after it tokenise as at a sequence start."""
        cached = getattr(self, "_prefix_cache", None)
        if cached is None:
            probe = "Describe the image. The image shows"
            alone = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
            cached = IMAGE_TOKEN
            for prefix in (IMAGE_TOKEN, IMAGE_TOKEN + " "):
                if self.tokenizer(prefix + probe, add_special_tokens=False)["input_ids"][1:] == alone:
                    cached = prefix
                    break
            self._prefix_cache = cached
        return cached

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """With an assistant message: `<image>{prompt} {response}` (what sare_ds tokenises). Without one: the
        bare prompt (the processor's `text`; it puts the image tokens in front itself)."""
        users = [m for m in messages if m["role"] == "user"]
        if len(users) != 1:
            raise ValueError(f"{self.source}: InstructBLIP takes one image and one prompt (a single user turn); got "
                             f"{len(users)} user turns. Fix: pass one prompt per image")
        prompt = message_text(users[0])
        answers = [m for m in messages if m["role"] == "assistant"]
        if answers:
            return f"{self._placeholder_prefix}{prompt} {''.join(message_text(m) for m in answers)}"
        return prompt

    # -- images --------------------------------------------------------------------------
    def processor_outputs(self, text: str, image, prompt: str) -> dict[str, torch.Tensor]:
        """Image tensors and the Q-Former's tokenisation of the PROMPT (never the response)."""
        out = self.processor(images=image, text=prompt, return_tensors="pt")
        return {k: v for k, v in out.items() if k not in self.processor_text_keys}

    def expand_image(self, text: str, ids: list[int], image, prompt: str, where: str = "") -> Expanded:
        where = where or self.source
        prefix = self._placeholder_prefix
        if not text.startswith(prefix):
            raise ExpansionMismatchError(
                f"{where}: the text {text[:60]!r} does not start with the image placeholder {prefix!r}; fix: render "
                "the conversation with InstructBlipAdapter.render")
        body = text[len(prefix):]
        llm = self.processor(images=image, text=body, return_tensors="pt")["input_ids"][0].tolist()
        n = self.processor.num_query_tokens
        bos, ph = self.tokenizer.bos_token_id, self.placeholder_token_id
        k = int(bool(ids) and bos is not None and ids[0] == bos)  # BOS in front (the tokenizer adds one)
        ours_ok = len(ids) > k and ids[k] == ph and ph not in ids[k + 1:]
        truth_ok = llm[:n] == [self.image_token_id] * n and llm[n:n + k] == [bos] * k and llm[n + k:] == ids[k + 1:]
        if not (ours_ok and truth_ok):
            where_diff = next((i for i, (a, b) in enumerate(zip(ids[k + 1:], llm[n + k:])) if a != b),
                              min(len(ids) - k - 1, len(llm) - n - k))
            raise ExpansionMismatchError(
                f"{where}: the InstructBLIP processor's sequence is not sare_ds's with the image moved before BOS: "
                f"sare_ds {ids[:4]}... ({len(ids)} tokens), processor {llm[n - 1:n + 3]}... after {n} image tokens "
                f"({len(llm)} tokens); first difference in the text at token {where_diff} "
                f"({self.tokenizer.decode(ids[k + 1 + where_diff:k + 4 + where_diff])!r} vs "
                f"{self.tokenizer.decode(llm[n + k + where_diff:n + k + 3 + where_diff])!r}). Fix: check the "
                "tokenizer (BOS added, the word-start marker after the placeholder) and processor_config.json "
                "num_query_tokens (must equal the model's)")
        return Expanded(llm, k, n, self.processor_outputs(text, image, prompt))

    def image_inputs(self, image) -> ImageInputs:
        out = self.processor(images=image, text="", return_tensors="pt")
        n = out["input_ids"][0].tolist().count(self.image_token_id)
        tensors = {k: v for k, v in out.items() if k not in self.processor_text_keys}
        return ImageInputs(tensors, n, [self.image_token_id] * n)

    # -- tiny ----------------------------------------------------------------------------
    @classmethod
    def build_tiny(cls, out_dir, *, seed: int = 0, corpus: list[str] | None = None):
        """A tiny random InstructBLIP-Vicuna: BLIP vision 32 px / patch 8, a 2-layer Q-Former (cross-attention every
        2nd layer, as the real one) with 8 query tokens and its own BERT WordPiece tokenizer ([DEC] as BOS), a
        2-layer Llama LM with a byte-level BPE (LLaVA/Vicuna special-token layout), no chat template."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
        from transformers import (
            BertTokenizer,
            BlipImageProcessor,
            InstructBlipConfig,
            InstructBlipForConditionalGeneration,
            InstructBlipProcessor,
            InstructBlipQFormerConfig,
            InstructBlipVisionConfig,
            LlamaConfig,
        )

        from sare_ds.models.tiny import SPECIAL_TOKENS, save_tiny, tiny_corpus, train_tokenizer

        corpus = tiny_corpus(corpus)
        out_dir = Path(out_dir)
        image_size, patch_size, n_query = 32, 8, 8
        # `<image>` is a special token of the vocabulary but not the tokenizer's named `image_token`, as in the
        # published checkpoints: the processor then registers it itself (with a named image_token,
        # transformers 5.24's InstructBlipProcessor fails on `image_token.content`).
        tokenizer = train_tokenizer(corpus, 600, special_tokens=SPECIAL_TOKENS, extra_special_tokens={},
                                    chat_template=None)
        tokenizer.chat_template = None
        # The Q-Former's tokenizer: bert-base-uncased style WordPiece, trained on the same corpus.
        wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        wp.normalizer = normalizers.BertNormalizer(lowercase=True)
        wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        wp.train_from_iterator(corpus, trainers.WordPieceTrainer(
            vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
        qformer_tokenizer = BertTokenizer(vocab=wp.get_vocab(), do_lower_case=True, model_max_length=512)
        qformer_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        image_processor = BlipImageProcessor(
            size={"height": image_size, "width": image_size}, resample=3,
            image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
        processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          qformer_tokenizer=qformer_tokenizer, num_query_tokens=n_query)
        vision = InstructBlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=image_size, patch_size=patch_size)
        qformer = InstructBlipQFormerConfig(vocab_size=len(qformer_tokenizer), hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                            cross_attention_frequency=2, encoder_hidden_size=32,
                                            pad_token_id=qformer_tokenizer.pad_token_id)
        text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
        config = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                    text_config=text.to_dict(), num_query_tokens=n_query,
                                    image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        torch.manual_seed(seed)
        model = InstructBlipForConditionalGeneration(config)
        # transformers initialises query_tokens and the linear biases to zeros (a checkpoint sets them): random
        # here, as in a trained model. A key bias's gradient is exactly zero (softmax ignores a shift shared by all
        # keys), so from zero its "update" would be rounding noise only, different on every layout.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.query_tokens.normal_(0.0, 0.02, generator=gen)
            for name, p in model.named_parameters():
                if name.endswith(".bias") and "LayerNorm" not in name and "layernorm" not in name:
                    p.normal_(0.0, 0.02, generator=gen)
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            setattr(model.generation_config, key, getattr(tokenizer, key))
        return save_tiny(out_dir, model, processor, family=cls.family, seed=seed)
