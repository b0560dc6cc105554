"""The one-sided Chebyshev (Cantelli) lower bound on the fraction of ReLU inputs that survive.

For a pre-activation Z with mean mu > 0 and variance sigma^2, Cantelli's inequality gives
``P(Z <= 0) = P(Z - mu <= -mu) <= sigma^2 / (sigma^2 + mu^2)``, hence

    P(Z > 0) >= mu^2 / (mu^2 + sigma^2)        (and only P(Z > 0) >= 0 when mu <= 0).

At He-normal initialisation a layer's learner output at one unit, for a fixed input x, is
``w . x`` with ``w ~ N(0, 2 / fan_in)``: mean 0 and variance ``sigma^2 = 2 ||x_patch||^2 / fan_in``.
What the variants add to it, before the ReLU, is a fixed (given x) mean:

- plain: nothing, mu = 0, so the bound is 0: half the units die, whichever they are.
- residual: the shortcut x_i >= 0 (a post-ReLU input), mu = x_i.
- PNNH: the coder's decoded path d_i(x) = (W_D relu(W_E x + b_E))_i, mu = d_i.

See docs/analysis.md for the derivation and what it does and does not say.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cantelli_survival_bound(mean: Tensor, variance: Tensor) -> Tensor:
    """Elementwise lower bound on P(Z > 0) for Z with this mean and variance (0 where mean <= 0)."""
    mean_sq = mean.square()
    bound = mean_sq / (mean_sq + variance).clamp_min(torch.finfo(mean.dtype).tiny)
    return torch.where(mean > 0, bound, torch.zeros_like(bound))
