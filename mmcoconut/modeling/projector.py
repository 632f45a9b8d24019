"""Vision -> LM projectors, chosen by name (LLaVA's names)."""
from __future__ import annotations

from torch import nn

PROJECTORS = ("linear", "mlp2x_gelu")


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """linear: one Linear; mlp2x_gelu: Linear -> GELU -> Linear (LLaVA-1.5)."""
    if name == "linear":
        return nn.Linear(in_dim, out_dim)
    if name == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {name!r}; choose from {PROJECTORS}")
