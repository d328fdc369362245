"""Quantizers: each config in conf/quantizer/ builds one of these."""

from qexp.quantizers.autoround import AutoRoundQuant
from qexp.quantizers.base import GridQuantizer, NoQuantizer, Quantizer
from qexp.quantizers.bnb import BitsAndBytes
from qexp.quantizers.gguf import GGUFQuant
from qexp.quantizers.gptqmodel import GPTQModelQuant
from qexp.quantizers.hqq import HQQQuant
from qexp.quantizers.llamacpp import LlamaCppQuant
from qexp.quantizers.llmcompressor import LLMCompressorQuant
from qexp.quantizers.rtn import RTN, rtn_fake_quant
from qexp.quantizers.sinq import SINQQuant

__all__ = [
    "RTN",
    "SINQQuant",
    "AutoRoundQuant",
    "BitsAndBytes",
    "GGUFQuant",
    "GPTQModelQuant",
    "GridQuantizer",
    "HQQQuant",
    "LlamaCppQuant",
    "LLMCompressorQuant",
    "NoQuantizer",
    "Quantizer",
    "rtn_fake_quant",
]
