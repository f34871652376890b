"""Model layer: loading through the adapter registry, trainable-set selection, errors."""
import pytest
import torch

from sare_ds.config import ModelConfig
from sare_ds.models import (
    NoTrainableParametersError, UnknownModelLayoutError, load_mllm, select_trainable,
)
from sare_ds import _torchvision_guard


def test_tiny_checkpoint_round_trips_through_from_pretrained(tiny_model_dir, adapter):
    from transformers import LlavaForConditionalGeneration

    again = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    for (n, a), (_, b) in zip(adapter.model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert adapter.family == "llava"
    assert adapter.tokenizer.is_fast and adapter.tokenizer.chat_template


def test_mapping_layers_are_the_projector(adapter):
    names = select_trainable(adapter, ModelConfig())
    assert names and all("multi_modal_projector" in n for n in names)
    frozen = [n for n, p in adapter.model.named_parameters() if not p.requires_grad]
    assert any("vision_tower" in n for n in frozen) and any("language_model" in n for n in frozen)


def test_regex_trainable_set(adapter):
    names = select_trainable(adapter, ModelConfig(trainable="regex", trainable_regex=r"lm_head"))
    assert names == ["lm_head.weight"]
    with pytest.raises(NoTrainableParametersError, match="no parameter matches.*trainable_regex"):
        select_trainable(adapter, ModelConfig(trainable="regex", trainable_regex=r"no_such_layer"))


def test_lora_on_the_language_model_only(adapter):
    names = select_trainable(adapter, ModelConfig(trainable="mapping+lora", lora_r=2))
    lora = [n for n in names if "lora_" in n]
    assert lora and all("language_model" in n for n in lora)
    assert any(n.endswith("q_proj.lora_A.default.weight") for n in lora)
    assert any("multi_modal_projector" in n for n in names)
    assert not any("vision_tower" in n for n in names)
    # The wrapped model still runs a forward.
    out = adapter.model(input_ids=torch.tensor([[1, 5, 6]]))
    assert out.logits.shape[:2] == (1, 3)


def test_unknown_layout_is_named(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnknownModelLayoutError, match="gpt2.*model.family"):
        load_mllm(ModelConfig(name_or_path=str(tmp_path)))


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(OSError, match="model.name_or_path"):
        load_mllm(ModelConfig(name_or_path=str(tmp_path / "absent")))


def test_torchvision_guard_acts_only_when_ops_fail(monkeypatch):
    import torchvision  # noqa: F401  (imports here: the guard did its job if needed)

    # On this machine the guard's verdict agrees with a direct load attempt.
    assert _torchvision_guard._state["patched"] == (_torchvision_guard.compiled_ops_load() is False)
    state = dict(_torchvision_guard._state)
    try:
        _torchvision_guard._state.update(checked=False, patched=False)
        monkeypatch.setattr(_torchvision_guard, "compiled_ops_load", lambda: True)
        monkeypatch.delitem(__import__("sys").modules, "torchvision")
        assert _torchvision_guard.install() is False  # loadable ops: nothing is defined
    finally:
        _torchvision_guard._state.clear()
        _torchvision_guard._state.update(state)
