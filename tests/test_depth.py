"""The paper's central claim in the tests' spirit: at depth 64 a plain net stops learning on real
data while the same net with a shared coder (PNNH) and the residual net learn.

The recipe is the demo's, and the assertions are relative (each variant against plain), not fixed
numbers: a change to the layer that breaks the internal path shows up here.
"""

from __future__ import annotations

import math

import pytest
import torch

from pnnh_kernels.models import deep_cnn
from pnnh_kernels.training.digits import load_digits_split, train_classifier


@pytest.mark.slow
def test_depth_64_plain_collapses_while_pnnh_and_residual_learn():
    data = load_digits_split()
    results = {}
    for variant in ("plain", "pnnh", "residual"):
        torch.manual_seed(0)
        model = deep_cnn(64, 16, variant)
        results[variant] = train_classifier(model, data, epochs=12, batch_size=64, max_lr=0.05)
    plain = results["plain"]
    chance_loss = math.log(10)
    assert not plain.diverged
    assert plain.train_loss > 0.7 * chance_loss, results
    for variant in ("pnnh", "residual"):
        result = results[variant]
        assert not result.diverged, results
        assert result.train_loss < 0.5 * plain.train_loss, results
        assert result.test_accuracy > plain.test_accuracy + 0.4, results
