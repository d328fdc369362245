"""qexp.audit: find quantization-conditioned tampering in a checkpoint before it is quantized.

    python -m qexp.audit CHECKPOINT [--reference CLEAN] [--quantizer a,b,...] [--out DIR]

Static checks stream the safetensors shards (one layer's few tensors at a time):

- `reparam` (qexp.audit.reparam): signs of function-preserving reparameterizations
  (attack=encrypt): V/O conditioning against its balanced refactoring, V/O and Q/K scale
  needles, MLP up/down channel-scale spread; absolute limits and robust z-scores against the
  model's own population of heads/layers.
- `gap` (qexp.audit.gap): the position u = (w - lo) / (hi - lo) of each weight inside each
  target quantizer's preserving interval; projected-descent repair piles weights at one u.
- `outlier` (qexp.audit.outlier): per block of 32 input weights, max |w| / second max |w|;
  outlier injection (attack=outlier) puts one huge weight in every block of its matrices.
- `reference` (qexp.audit.refdiff): where and how the weights differ from a trusted checkpoint.
- `differential` (qexp.audit.differential, optional, loads the model): fake-quantize with
  each target and measure the logit divergence on probe prompts.

Exit code: 0 clean, 1 suspicious, 2 error.
"""

from qexp.checkpoint.reader import Checkpoint

__all__ = ["Checkpoint"]
