"""bitsandbytes through transformers' BitsAndBytesConfig: LLM.int8(), NF4, FP4 (block 64).

The model is written to a temporary safetensors checkpoint and reloaded with the
quantization config, exactly as a user of transformers would load it; inference then runs
bitsandbytes' own kernels (CPU back-end here, CUDA on a GPU).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, List

import torch
import transformers

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check, check_choice
from qexp.core.geometry import linear_shapes
from qexp.core.plugin import StageResult, Subject
from qexp.quantizers.base import GridQuantizer
from qexp.quantizers.intervals import codebook_intervals, int8_row_intervals

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

MODES = ("int8", "nf4", "fp4")


class _Once(logging.Filter):
    """Let each distinct message through once per process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


# bitsandbytes logs a warning on every LLM.int8 matmul of a float32 model (tens of thousands
# of lines in a gap-attack run); once per run says it
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Once())
BLOCK = 64  # 4-bit blocksize (transformers' default for bitsandbytes)


@dataclass
class BitsAndBytes(GridQuantizer):
    """LLM.int8 (row absmax / 127) or 4-bit NF4/FP4 (block 64 absmax), weights only."""

    name: str = "bnb_nf4"
    mode: str = "nf4"
    double_quant: bool = False
    compute_dtype: str = "float32"
    skip: List[str] = field(default_factory=lambda: ["lm_head"])

    saves_artifact: ClassVar[bool] = True
    plain_output: ClassVar[bool] = False  # Linear8bitLt / Linear4bit modules
    has_neighbours: ClassVar[bool] = True

    def audit_default(self) -> bool:
        """Every mode: transformers' `load_in_8bit` / `load_in_4bit` (nf4, fp4) is one flag."""
        return not self.double_quant

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

    def check_model(self, config: Any) -> None:
        if self.mode == "int8":
            return
        shapes = linear_shapes(config) or {}
        bad = {n: s for n, s in shapes.items() if (s[0] * s[1]) % BLOCK}
        check(
            not bad,
            "quantizer",
            self.name,
            f"a model whose linears have a multiple of {BLOCK} weights (4-bit blocks): {bad}",
        )

    def config(self) -> BitsAndBytesConfig:
        """The transformers quantization config for this mode."""
        if self.mode == "int8":
            return transformers.BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_skip_modules=self.skip
            )
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.mode,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            llm_int8_skip_modules=self.skip,
        )

    def quantize(self, subject: Subject, ctx: RunContext) -> StageResult:
        model = subject.model
        ctx.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=".bnb-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            generation_config = model.generation_config
            del model
            q = transformers.AutoModelForCausalLM.from_pretrained(
                tmp,
                quantization_config=self.config(),
                device_map={"": str(ctx.device)},
                dtype=ctx.dtype,
                use_safetensors=True,
            )
        q.generation_config = generation_config
        info = {"library": f"bitsandbytes {importlib.metadata.version('bitsandbytes')}"}
        if ctx.save_quantized:
            out = ctx.run_dir / "quantized" / subject.branch
            q.save_pretrained(out, safe_serialization=True)
            subject.tokenizer.save_pretrained(out)
            info["artifact"] = str(out.relative_to(ctx.run_dir))
        return StageResult(q.eval(), info)

    def library_input(self, w: torch.Tensor) -> torch.Tensor:
        """What bitsandbytes quantizes when transformers loads this weight: LLM.int8 casts to
        float16 (`Int8Params`) whatever the load dtype; 4-bit reads the load dtype."""
        x = w.detach().cpu()
        return x.to(torch.float16) if self.mode == "int8" else x.clone()

    def _quant(self, w: torch.Tensor):
        import bitsandbytes.functional as F

        x = self.library_input(w)
        if self.mode == "int8":
            q, scale, _ = F.int8_vectorwise_quant(x)
            return q, scale
        return F.quantize_4bit(x, blocksize=BLOCK, quant_type=self.mode)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as F

        if self.mode == "int8":
            q, scale = self._quant(w)
            return q.float() * (scale.float()[:, None] / 127.0)
        packed, st = self._quant(w)
        return F.dequantize_4bit(packed, st).float()

    def neighbours(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import bitsandbytes.functional as F

        if self.mode == "int8":
            q, scale = self._quant(w)
            step = scale.float()[:, None] / 127.0
            q = q.float()
            return q.sub(1).clamp(-127, 127) * step, q.add(1).clamp(-127, 127) * step
        packed, st = self._quant(w)
        deq = F.dequantize_4bit(packed, st).float().reshape(-1)
        a = st.absmax.float().repeat_interleave(BLOCK)[: deq.numel()]
        levels = torch.unique(F.get_4bit_type(self.mode, device="cpu").float())  # sorted
        i = (deq / a.clamp_min(1e-30))[:, None].sub(levels[None, :]).abs().argmin(1)
        down = levels[(i - 1).clamp_min(0)] * a
        up = levels[(i + 1).clamp_max(len(levels) - 1)] * a
        return down.reshape(w.shape), up.reshape(w.shape)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """What bitsandbytes stores for a [out, in] weight on the transformers loading path
        (int8 values and row scales; or packed 4-bit codes and block absmax), flattened."""
        if self.mode == "int8":
            q, scale = self._quant(w)
            return torch.cat([q.reshape(-1).float(), scale.reshape(-1).float()])
        packed, st = self._quant(w)
        return torch.cat([packed.reshape(-1).float(), st.absmax.reshape(-1).float()])

    def weight_codes(self, w: torch.Tensor) -> torch.Tensor:
        """Per-weight codes: int8 values, or 4-bit indices (high nibble first)."""
        n = w.numel()
        c = self.codes(w)
        if self.mode == "int8":
            return c[:n].to(torch.int32).reshape(w.shape)
        packed = c[: n // 2].to(torch.int32)
        return torch.stack([packed >> 4, packed & 0x0F], 1).reshape(w.shape)

    def intervals(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preserving intervals of a [out, in] weight under this mode."""
        if self.mode == "int8":
            return int8_row_intervals(w)
        import bitsandbytes.functional as F

        return codebook_intervals(w, F.get_4bit_type(self.mode, device="cpu"), BLOCK)
