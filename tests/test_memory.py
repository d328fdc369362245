"""The memory plan: size from config.json, refusal before loading, placement, peak RSS per
stage, and the probes' other dtype without a second model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qexp.core import memory
from qexp.core.errors import ConfigError
from qexp.core.geometry import param_count
from qexp.pipeline.preservation import computed_in
from qexp.pipeline.run import run
from tests.test_encrypt import tiny


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("llama", {}),
        ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}),
        ("qwen2", {}),
        ("mistral", {"tie_word_embeddings": False}),
        ("qwen3", {}),
    ],
)
def test_param_count_from_config_is_exact(arch, extra):
    cfg = AutoConfig.for_model(
        arch,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        vocab_size=128,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    real = sum(p.numel() for p in model.parameters())  # tied weights once
    assert param_count(cfg) == real
    assert param_count(cfg.to_dict()) == real


def test_a_model_that_does_not_fit_is_refused_before_loading(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available", lambda device: (1 << 10, "test budget"))
    loads = []
    monkeypatch.setattr("qexp.models.tiny.TinyModel.load", lambda *a: loads.append(a))
    with pytest.raises(ConfigError) as e:
        run(make_cfg("dtype=bfloat16"), tmp_path)
    assert e.value.key == "model" and e.value.value == "tiny_llama"
    assert "in bfloat16 its weights need" in e.value.allowed and "test budget" in e.value.allowed
    assert not loads and not (tmp_path / "results.json").exists()


def test_results_record_the_plan_model_bytes_and_peaks(make_cfg, tmp_path):
    run(make_cfg("attack=encrypt", "attack.preset=exact"), tmp_path)
    mem = json.loads((tmp_path / "results.json").read_text())["memory"]
    # the estimate from config.json is the loaded model's parameters (fp32); buffers aside
    assert 0 <= mem["model_bytes"] - mem["plan"]["weight_bytes"] < 1024
    assert mem["plan"]["available_bytes"] > mem["plan"]["needs_bytes"] > 0
    stages = mem["peak_rss_mb"]
    for s in ("load_original", "evaluate_original", "attack_attacked", "quantize_attacked"):
        assert stages[s] >= mem["baseline_rss_mb"] * 0.5, s
    assert mem["peak_method"] in ("VmHWM reset per stage", "ru_maxrss (peak since start)")


def test_peak_rss_window_sees_an_allocation():
    p = memory.PeakRSS()
    base = p.now_mb()
    x = torch.ones(64 << 20)  # 256 MiB
    x.add_(1)
    assert p.peak_mb() >= base + 200
    del x
    p.reset()
    if p.exact:  # Linux: the window starts again at the current RSS
        assert p.peak_mb() < base + 100


def test_device_map_places_by_size(monkeypatch):
    cfg = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    }
    assert memory.device_map(cfg, torch.bfloat16, torch.device("cpu")) is None
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for free, count, want in (
        (80 * gib, 1, {"": "cuda:0"}),  # an 8B model in bf16 (16 GB) fits one 80 GB GPU
        (12 * gib, 2, "auto"),  # two 12 GB GPUs: spread over both
        (12 * gib, 1, {"": "cuda:0"}),  # one GPU only: check_fits refuses it beforehand
    ):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i, f=free: (f, f))
        monkeypatch.setattr(torch.cuda, "device_count", lambda c=count: c)
        assert memory.device_map(cfg, torch.bfloat16, torch.device("cuda")) == want
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (12 * gib, 12 * gib))
    with pytest.raises(ConfigError, match="weights need 15.0 GiB"):
        memory.check_fits(cfg, torch.bfloat16, torch.device("cuda:0"), "model", "llama8b")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    free, _ = memory.available(torch.device("cuda"))
    assert free == 2 * 12 * gib  # a bare `cuda` counts every GPU


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_other_dtype_logits_without_a_copy_equal_a_cast_copy(arch, stored):
    m = tiny(arch, 4, 2, 16, bias=arch == "llama").to(stored)
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in m.state_dict().items()}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            want = copy.deepcopy(m).to(dtype)(input_ids=ids).logits
            with computed_in(m, dtype):
                got = m(input_ids=ids).logits
        assert torch.equal(want, got), dtype
    after = m.state_dict()
    assert all(
        torch.equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in before
    )
