"""Bad config values fail before any model is loaded, with one message naming key/value/allowed."""

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from qexp.core.errors import ConfigError
from qexp.models.embedded import EmbeddedGGUFModel
from qexp.models.tiny import TinyModel
from qexp.pipeline.spec import validate
from qexp.quantizers.rtn import RTN


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Any model load during validation is a bug: make it fail loudly."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded during validation")

    monkeypatch.setattr(TinyModel, "load", boom)
    monkeypatch.setattr(EmbeddedGGUFModel, "load", boom)


@pytest.mark.parametrize(
    ("override", "key", "value", "allowed"),
    [
        ("benchmark.limit=-3", "benchmark.limit", -3, "integer >= 1"),
        ("benchmark.limit=abc", "benchmark.limit", "abc", "int"),
        ("conditions=[foo]", "conditions", "foo", "original, attacked, original_q, attacked_q"),
        ("conditions=[]", "conditions", [], "non-empty"),
        ("model=hf", "model.id", "???", "required"),
        ("dtype=fp8", "dtype", "fp8", "float32, bfloat16, float16"),
        ("device=tpu", "device", "tpu", "auto, cpu, cuda"),
        ("seed=x", "seed", "x", "int"),
        ("quantizer.bits=7", "quantizer.bits", 7, "one of 2, 3, 4, 5, 6, 8"),
        ("quantizer.group_size=0", "quantizer.group_size", 0, ">= 2"),
        ("+benchmark.foo=1", "benchmark.foo", 1, "known keys"),
        ("benchmark.few_shot=99", "benchmark.few_shot", 99, "0..8"),
        ("logger=wandb", None, None, None),  # valid: must not raise
        ("model.arch=gpt2", "model.arch", "gpt2", "llama, qwen2, mistral, qwen3"),
        ("model.num_kv_heads=3", "model.num_kv_heads", 3, "divisor of num_heads=4"),
    ],
)
def test_bad_values_name_key_value_and_allowed(make_cfg, override, key, value, allowed):
    cfg = make_cfg(override)
    if key is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == key
    assert e.value.value == value
    assert allowed in e.value.allowed
    assert key in str(e.value) and allowed in str(e.value)


def test_model_path_that_does_not_exist(make_cfg, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="model.id") as e:
        validate(make_cfg("model=hf", f"model.id={missing}"))
    assert e.value.value == str(missing)


def test_model_dir_without_safetensors_is_refused(make_cfg, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="safetensors") as e:
        validate(make_cfg("model=hf", f"model.id={tmp_path}"))
    assert "never loaded" in e.value.allowed


def test_benchmark_path_must_exist(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="benchmark.path"):
        validate(make_cfg(f"benchmark.path={tmp_path}/x.jsonl"))


def test_unknown_group_option_lists_the_choices(make_cfg):
    with pytest.raises(MissingConfigException) as e:
        make_cfg("quantizer=gptq5")
    msg = str(e.value)
    assert "gptq5" in msg and "quantizer" in msg
    assert e.value.options is not None and {"rtn4", "rtn8", "none"} <= set(e.value.options)


def test_valid_config_builds_typed_plugins(make_cfg):
    spec = validate(make_cfg("quantizer=rtn8", "quantizer.symmetric=true"))
    assert isinstance(spec.quantizer, RTN)
    assert spec.quantizer.bits == 8 and spec.quantizer.symmetric is True
    assert spec.run.conditions == ["original", "attacked", "original_q", "attacked_q"]


def test_every_shipped_config_validates(make_cfg):
    from tests.conftest import CONF

    for group_dir in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "experiment"):
        for option in sorted(group_dir.glob("*.yaml")):
            over = [f"{group_dir.name}={option.stem}"]
            if group_dir.name == "model" and option.stem == "hf":
                over.append("model.id=org/name")
            if group_dir.name == "attack" and option.stem == "prune_gap":
                over.append("prune=wanda")  # it targets the run's pruning
            if group_dir.name == "benchmark" and option.stem == "humaneval":
                over.append("benchmark.allow_code_execution=true")  # opt-in by design
            if group_dir.name != "model":
                over.insert(0, "model=tiny_llama")
            cfg = make_cfg(*over, tiny=False)
            spec = validate(cfg)
            plugin = getattr(spec, group_dir.name)
            assert plugin.name == OmegaConf.select(cfg, f"{group_dir.name}.name") == option.stem


def test_threads_default_follows_omp_num_threads(monkeypatch):
    from qexp.core.context import available_cores, default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert default_threads() == available_cores()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == available_cores()


HUB_MODELS = [
    "llama8b",
    "qwen7b",
    "llama3_8b_instruct",
    "qwen2_5_7b_instruct",
    "mistral7b_instruct",
]  # noqa: E501


@pytest.mark.parametrize("model", HUB_MODELS)
def test_hub_models_default_to_bfloat16(make_cfg, model):
    cfg = make_cfg(f"model={model}", tiny=False)
    assert cfg.dtype == "bfloat16" and cfg.model.name == model and "/" in cfg.model.id
    assert make_cfg(f"model={model}", "dtype=float32", tiny=False).dtype == "float32"
    assert make_cfg(tiny=False).dtype == "float32"  # the embedded default stays fp32
