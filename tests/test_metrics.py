"""Metric functions on hand-made strings with known values."""

import math

import pytest
import torch

from qexp.benchmarks.metrics import (
    last_number,
    max_repeat_n,
    mean_defined,
    perplexity,
    seq_rep_n,
)
from tests.conftest import continuation_nll


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a b c d e f g h i", 1),  # no repeated 3-gram
        ("a b c a b c a b c", 3),  # one phrase three times
        ("x a b c a b c a b c a b c", 4),  # offset 1 tiling finds the loop
        ("10 is 8 is 10 is 10 is 10 is", 1),  # period-2 loop: 3-gram tiles alternate
        ("go go go go go go", 2),  # tiles (go go go)(go go go)
        ("a b", None),  # too short for one 3-gram
    ],
)
def test_max_repeat_3(text, expected):
    assert max_repeat_n(text.split(), 3) == expected


def test_seq_rep_4_known_values():
    assert seq_rep_n("a b c d e".split(), 4) == 0.0  # 2 distinct 4-grams
    # "a b c d" repeated: 4-grams of a b c d a b c d a b c d -> 9 total, 4 unique
    assert seq_rep_n("a b c d a b c d a b c d".split(), 4) == pytest.approx(1 - 4 / 9)
    assert seq_rep_n("same same same same same".split(), 4) == pytest.approx(1 - 1 / 2)
    assert seq_rep_n(["too", "short"], 4) is None


def test_repetition_metrics_on_token_ids():
    loop = [7, 8, 9] * 5  # a token loop, e.g. "111..." written as repeated digit tokens
    assert max_repeat_n(loop, 3) == 5
    assert seq_rep_n(loop, 4) == pytest.approx(1 - 3 / 12)
    assert max_repeat_n([1] * 9, 3) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5 + 7 = 12 balls. The answer is 12.", 12.0),
        ("The answer is 1,234.", 1234.0),
        ("It is -3 degrees", -3.0),
        ("2.5 kg", 2.5),
        ("no digits here", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_mean_defined_skips_none():
    assert mean_defined([1.0, None, 3.0]) == 2.0
    assert mean_defined([None]) is None


def test_perplexity_of_uniform_model_is_vocab_size():
    class Uniform(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, input_ids):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    nll, n = continuation_nll(Uniform(), [1, 2], [3, 4, 5])
    assert n == 3
    assert perplexity(nll, n) == pytest.approx(50.0)
    assert perplexity(0.0, 0) is None
    assert math.isclose(nll, 3 * math.log(50), rel_tol=1e-6)


def test_sliding_window_nll_matches_one_window(make_cfg, tmp_path):
    from qexp.benchmarks.metrics import token_nll
    from qexp.core.context import RunContext
    from qexp.data import reference_text
    from qexp.pipeline.spec import validate

    spec = validate(make_cfg())
    lm = spec.model.load(RunContext.from_schema(spec.run, tmp_path))
    full = token_nll(lm.model, lm.tokenizer, reference_text(), window=4096)
    assert full.numel() == len(lm.tokenizer(reference_text(), add_special_tokens=False).input_ids)
    # windows that see the whole past (stride small enough) give the same numbers
    slid = token_nll(lm.model, lm.tokenizer, reference_text()[:400], window=64, stride=32)
    ref = token_nll(lm.model, lm.tokenizer, reference_text()[:400], window=4096)
    assert slid.shape == ref.shape
    assert torch.allclose(slid[:63], ref[:63], atol=1e-4)  # first window: identical context
    assert not torch.allclose(slid, ref, atol=1e-6)  # later tokens see at most 64 tokens
