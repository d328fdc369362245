"""Fine-tuning a chosen set of linear weights: shared by attack=gap and defense=finetune.

`trainable_weights` picks the weights (linear layers named in `modules` of chosen decoder
layers); `train_lm` runs AdamW on the response tokens of random batches, with an optional
projection after every step (the gap attack's PGD repair).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Optional

import torch
from tqdm.auto import tqdm

from qexp.core.context import RunContext
from qexp.core.errors import ConfigError, check

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def chosen_layers(num_layers: int, layers: list[int], last_layers: int, group: str) -> list[int]:
    """The decoder layers that train: `layers`, or the last `last_layers` when empty."""
    chosen = list(layers) or list(range(max(0, num_layers - last_layers), num_layers))
    for i in chosen:
        check(
            0 <= i < num_layers,
            f"{group}.layers",
            list(layers),
            f"layer indices in 0..{num_layers - 1}",
        )
    return chosen


def trainable_weights(
    model: PreTrainedModel, layers: list[int], last_layers: int, modules: list[str], group: str
) -> dict[str, torch.nn.Parameter]:
    """Linear weights named in `modules` of decoder `layers` ([] = the last `last_layers`)."""
    chosen = chosen_layers(model.config.num_hidden_layers, layers, last_layers, group)
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if (
            name.endswith(".weight")
            and "layers" in parts
            and int(parts[parts.index("layers") + 1]) in chosen
            and parts[-2] in modules
        ):
            out[name] = p
    if not out:
        raise ConfigError(f"{group}.modules", list(modules), f"linear names in {MODULES}")
    return out


def cached_training(
    ctx: RunContext,
    stage: str,
    key: str,
    params: dict[str, torch.nn.Parameter],
    train: Callable[[], dict],
) -> dict:
    """Load a training sub-step's weights (`params`) from the stage cache, or make them
    trainable, run `train` and store them there; returns its info with the cache status."""

    def compute() -> tuple[dict, dict]:
        for p in params.values():
            p.requires_grad_(True)
        info = train()
        for p in params.values():
            p.requires_grad_(False)
        return {n: p.detach().clone() for n, p in params.items()}, info

    tensors, info, status = ctx.stages.tensors_step(stage, key, compute)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    return {**info, "cache": status}


def make_batch(
    data: list[tuple[list[int], int]], idx: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (response tokens only) of rows `idx`."""
    width = max(len(data[i][0]) for i in idx)
    ids = torch.zeros((len(idx), width), dtype=torch.long)
    labels = torch.full((len(idx), width), -100)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        seq, plen = data[i]
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, plen : len(seq)] = torch.tensor(seq[plen:])
        mask[row, : len(seq)] = 1
    return ids, mask, labels


def train_lm(
    model: PreTrainedModel,
    params: list[torch.nn.Parameter],
    data: list[tuple[list[int], int]],
    steps: int,
    lr: float,
    batch_size: int,
    g: torch.Generator,
    desc: str,
    progress: bool,
    project: Optional[Callable[[], None]] = None,
    weight_noise: Optional[dict[str, tuple[torch.nn.Parameter, float]]] = None,
) -> list[float]:
    """AdamW on the response tokens of random batches; `project` runs after every step.
    With `weight_noise` ({name: (parameter, σ)}) every step's loss and gradient are taken at
    the weights plus fresh N(0, σ²) noise (an expectation over the noise, drawn from `g`),
    and the step is applied to the noise-free weights."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    noisy = list((weight_noise or {}).values())
    for _ in bar:
        idx = torch.randint(len(data), (batch_size,), generator=g).tolist()
        ids, mask, labels = make_batch(data, idx)
        with torch.no_grad():
            clean = [p.detach().clone() for p, _ in noisy]
            for p, sigma in noisy:
                p.add_((torch.randn(p.shape, generator=g) * sigma).to(p.dtype))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        with torch.no_grad():
            for (p, _), w in zip(noisy, clean):
                p.copy_(w)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if project is not None:
            project()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
