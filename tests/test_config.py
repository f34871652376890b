"""Config tree: defaults from method.md, YAML + overrides, validation messages, dump round trip."""
import dataclasses

import pytest

from sare_ds.config import (
    ConfigError, TrainConfig, dump_config, field_docs, load_config, save_config, validate,
)


def test_defaults_follow_the_method():
    cfg = TrainConfig()
    validate(cfg)
    assert (cfg.method.name, cfg.method.rho, cfg.method.lambda1) == ("sare", 0.05, 0.3)
    assert 0.2 <= cfg.method.lambda2 <= 0.3
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.epochs) == ("adamw", 1e-5, 0.05, 1)
    from sare_ds.curation.config import load_curation_config

    split = load_curation_config(None, ["input.path=images"]).split  # the thresholds belong to curation
    assert (split.t0, split.t1, split.t2) == (32.0, 23.0, 27.5)
    assert cfg.model.trainable == "mapping"


def test_every_field_has_a_docstring():
    for section in dataclasses.fields(TrainConfig):
        cls = section.default_factory().__class__
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: efuf\n  lambda1: 0.2\noptim:\n  lr: 2.0e-5\n")
    cfg = load_config(path, ["method.lambda1=0.1", "model.lora_target_modules=[q_proj,k_proj]", "optim.adam_eps=1e-6"])
    assert cfg.method.name == "efuf" and cfg.method.lambda1 == 0.1 and cfg.optim.lr == 2e-5
    assert cfg.optim.adam_eps == 1e-6  # YAML 1.1 would read 1e-6 as a string
    assert cfg.model.lora_target_modules == ["q_proj", "k_proj"]


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["method.rho=0.07", "output.run_dir=/x/y", "data.prompt=Describe: it."])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert "# SARE perturbation radius" in dump_config(cfg)


@pytest.mark.parametrize("override, needles", [
    ("method.rho=-0.1", ["method.rho", ">= 0", "Fix"]),
    ("method.lambda1=-1", ["method.lambda1", ">= 0", "Fix"]),
    ("method.lambda2=-0.5", ["method.lambda2", ">= 0"]),
    ("method.name=dpo", ["method.name", "'dpo'", "ft, efuf or sare"]),
    ("optim.lr=0", ["optim.lr", "> 0"]),
    ("optim.epochs=0", ["optim.epochs", ">= 1"]),
    ("optim.clip_grad_norm=-1", ["optim.clip_grad_norm"]),
    ("model.dtype=float8", ["model.dtype", "bfloat16"]),
    ("model.trainable=regex", ["model.trainable_regex", "needs a pattern"]),
    ("model.trainable_regex=model.(layers", ["model.trainable_regex = 'model.(layers'", "not a regular expression",
                                              "missing )", "Fix: write a Python regex"]),
    ("optim.lr=inf", ["optim.lr = inf", "finite", "Fix"]),
    ("optim.lr=1e30", ["optim.lr = 1e+30", "at most optim.max_lr = 1", "raise optim.max_lr"]),
    ("method.rho=.nan", ["method.rho = nan", "finite"]),
    ("model.lm_head_chunks=-1", ["model.lm_head_chunks", ">= 0", "use 8"]),
    ("method.rhoo=0.1", ["unknown config field `method.rhoo`", "did you mean `method.rho`"]),
    ("method.rho=abc", ["method.rho", "expected float"]),
    ("method.rho", ["section.field=value"]),
])
def test_validation_errors_name_field_rule_and_fix(override, needles):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for needle in needles:
        assert needle in str(err.value)


def _suggestion(message: str) -> list[str]:
    """The overrides a validation message's fix suggests (`field=value`, or `use VALUE` for the field named)."""
    import re

    field, fix = message.split(" = ", 1)[0].strip(), message.split("Fix: ", 1)[1]
    pairs = re.findall(r"([a-z_]+\.[a-z_0-9]+)=('[^']*'|\[[^\]]*\]|[^\s,;)]+)", fix)
    if pairs:
        return [f"{k}={v.strip(chr(39))}" for k, v in pairs]
    use = re.search(r"\buse (\[[^\]]*\]|[^\s,;)]+)", fix)
    return [f"{field}={use.group(1)}"] if use else []


@pytest.mark.parametrize("bad", [
    "method.rho=-0.1", "method.lambda1=-1", "method.lambda2=-0.5", "optim.lr=0", "optim.lr=1e30", "optim.lr=inf",
    "optim.max_lr=0", "optim.epochs=0", "optim.grad_accum_steps=0", "optim.warmup_steps=-1", "optim.betas=[1, 1]",
    "optim.weight_decay=-1", "optim.kernels=cuda", "optim.schedule=linear", "optim.optimizer=lion", "model.dtype=int8",
    "model.lora_r=0", "model.lora_dropout=1", "model.lm_head_chunks=-1", "model.trainable=regex",
    "model.trainable_regex=a(b", "model.attn_implementation=xformers", "data.max_length=0", "data.num_workers=-1",
    "data.shuffle_buffer=0", "data.captions_per_step=0", "data.source=web", "logging.log_every=0",
    "distributed.backend=mpi", "method.rho=.inf", "optim.adam_eps=.nan",
])
def test_fix_hints_suggest_values_validation_accepts(bad):
    """Each refusal's fix, applied, passes validation (a hint never suggests a value validation rejects)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [bad])
    fix = _suggestion(str(err.value))
    assert fix, f"no value suggested in: {err.value}"
    load_config(None, [bad, *fix])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_docs_config_reference_is_current():
    from pathlib import Path

    from sare_ds.config import config_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_markdown(), "regenerate: python -m sare_ds.config > docs/config.md"


def test_curation_thresholds_are_validated():
    from sare_ds.curation.config import load_curation_config

    with pytest.raises(ConfigError) as err:
        load_curation_config(None, ["input.path=images", "split.t1=40"])
    assert "split.t1" in str(err.value) and "split.t0" in str(err.value)
