"""bitsandbytes through transformers' BitsAndBytesConfig: LLM.int8(), NF4, FP4 (block 64).

The model is written to a temporary safetensors checkpoint and reloaded with the
quantization config, exactly as a user of transformers would load it; inference then runs
bitsandbytes' own kernels (CPU back-end here, CUDA on a GPU).
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass, field
from typing import List

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from qexp.context import RunContext
from qexp.errors import ConfigError, check_choice
from qexp.quantizers.base import GridQuantizer
from qexp.quantizers.intervals import codebook_intervals, int8_row_intervals

MODES = ("int8", "nf4", "fp4")


@dataclass
class BitsAndBytes(GridQuantizer):
    """LLM.int8 (row absmax / 127) or 4-bit NF4/FP4 (block 64 absmax), weights only."""

    name: str = "bnb_nf4"
    mode: str = "nf4"
    double_quant: bool = False
    compute_dtype: str = "float32"
    skip: List[str] = field(default_factory=lambda: ["lm_head"])
    saves_artifact = True
    plain_output = False  # Linear8bitLt / Linear4bit modules

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("compute_dtype", self.compute_dtype, ("float32", "bfloat16", "float16"))
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "quantizer",
                self.name,
                "another quantizer, or install the "
                "extra: pip install 'qexp[bnb]' (bitsandbytes >= 0.48)",
            )

    def config(self) -> BitsAndBytesConfig:
        """The transformers quantization config for this mode."""
        if self.mode == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=self.skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.mode,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            llm_int8_skip_modules=self.skip,
        )

    def quantize(self, model: PreTrainedModel, ctx: RunContext) -> PreTrainedModel:
        ctx.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=".bnb-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            generation_config = model.generation_config
            del model
            q = AutoModelForCausalLM.from_pretrained(
                tmp,
                quantization_config=self.config(),
                device_map={"": str(ctx.device)},
                dtype=ctx.dtype,
                use_safetensors=True,
            )
        q.generation_config = generation_config
        if ctx.save_quantized:
            out = ctx.run_dir / "quantized" / ctx.branch
            q.save_pretrained(out, safe_serialization=True)
            if ctx.tokenizer is not None:
                ctx.tokenizer.save_pretrained(out)
            self.last_info = {"artifact": str(out.relative_to(ctx.run_dir))}
        return q.eval()

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as F

        x = w.detach().float().cpu().clone()
        if self.mode == "int8":
            q, scale, _ = F.int8_vectorwise_quant(x)
            return q.float() * (scale.float()[:, None] / 127.0)
        packed, st = F.quantize_4bit(x, blocksize=64, quant_type=self.mode)
        return F.dequantize_4bit(packed, st).float()

    def neighbours(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import bitsandbytes.functional as F

        x = w.detach().float().cpu().clone()
        if self.mode == "int8":
            q, scale, _ = F.int8_vectorwise_quant(x)
            step = scale.float()[:, None] / 127.0
            q = q.float()
            return q.sub(1).clamp(-127, 127) * step, q.add(1).clamp(-127, 127) * step
        packed, st = F.quantize_4bit(x, blocksize=64, quant_type=self.mode)
        deq = F.dequantize_4bit(packed, st).float().reshape(-1)
        a = st.absmax.float().repeat_interleave(64)[: deq.numel()]
        levels = torch.unique(F.get_4bit_type(self.mode, device="cpu").float())  # sorted
        i = (deq / a.clamp_min(1e-30))[:, None].sub(levels[None, :]).abs().argmin(1)
        down = levels[(i - 1).clamp_min(0)] * a
        up = levels[(i + 1).clamp_max(len(levels) - 1)] * a
        return down.reshape(w.shape), up.reshape(w.shape)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' own quantization of a [out, in] weight: codes, then scales."""
        import bitsandbytes.functional as F

        x = w.detach().float().cpu().clone()
        if self.mode == "int8":
            q, scale, _ = F.int8_vectorwise_quant(x)
            return torch.cat([q.reshape(-1).float(), scale.reshape(-1).float()])
        packed, st = F.quantize_4bit(x, blocksize=64, quant_type=self.mode)
        return torch.cat([packed.reshape(-1).float(), st.absmax.reshape(-1).float()])

    def intervals(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preserving intervals of a [out, in] weight under this mode."""
        if self.mode == "int8":
            return int8_row_intervals(w)
        import bitsandbytes.functional as F

        return codebook_intervals(w, F.get_4bit_type(self.mode, device="cpu"), 64)
