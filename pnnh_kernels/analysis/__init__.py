"""The paper's analysis of dissipating inputs, as tools (docs/analysis.md)."""

from pnnh_kernels.analysis.bounds import cantelli_survival_bound
from pnnh_kernels.analysis.curves import he_stack, layer_curves
from pnnh_kernels.analysis.probes import (
    ReluSiteStats,
    coder_gain,
    dissipation_report,
    mean_cosine_similarity,
    ridge_r2,
    survival_fraction,
)

__all__ = [
    "ReluSiteStats",
    "cantelli_survival_bound",
    "coder_gain",
    "dissipation_report",
    "he_stack",
    "layer_curves",
    "mean_cosine_similarity",
    "ridge_r2",
    "survival_fraction",
]
