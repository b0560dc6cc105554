"""A Vision Transformer in three variants from one definition: residual, plain and PNNH.

Every block is two sublayers, attention and MLP, each ``body(LayerNorm(x))`` on the token stream
``x``:

- ``"residual"``: the standard pre-norm ViT, ``x + body(LN(x))``.
- ``"plain"``: the residual connections removed, ``body(LN(x))``.
- ``"pnnh"``: plain plus an internal path: ``body(LN(x)) + W_D relu(W_E x + b_E)``, a coder
  (:class:`PNNHCoder`) reading the sublayer's own input ``x`` and adding its reconstruction to the
  sublayer's output, as a PNNH conv layer adds it to its learner's (docs/pnnh.md). Coders are shared
  as in the conv nets' stages: one by all attention sublayers, one by all MLP sublayers (a ViT has
  a single stage; every block has the same width). The coder reads ``x`` rather than ``LN(x)`` so
  that the path carries the stream itself, as a residual connection would, and not its normalised
  copy.

FusedPNNHLinear does not fit here: its coder reads the learner's own input, while a sublayer's
learner reads ``LN(x)`` and its coder ``x``, and the MLP's activation is GELU, which the fused
kernels do not have. The coder runs as PNNHCoder's two linear maps; attention is PyTorch's
``scaled_dot_product_attention``. The stream of a ViT is signed, unlike the post-ReLU inputs a
conv layer's coder sees: the default rectified-isometry coder (non-negative encoder rows) passes
only the part of ``x`` its ReLU keeps, so the PNNH path carries less here than in a CNN.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnnh_kernels.coder import (
    DEFAULT_CODER_INIT,
    CoderUser,
    PNNHCoder,
    default_code_channels,
)
from pnnh_kernels.models.coder_bank import check_variant
from pnnh_kernels.validation import check_positive_int

PRESETS = {
    # dim, depth, heads (DeiT's Tiny and Small; the MLP is 4x wide in both)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
}


class Attention(nn.Module):
    """Multi-head self-attention over [batch, tokens, dim] (scaled_dot_product_attention)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: dim {dim} must divide evenly over {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, heads, tokens, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # a module, so that analysis hooks (dissipation_report) see it
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SignedCoder(nn.Module):
    """A coder for a signed stream (issue #26): ``W_E = [P; -P]``, ``W_D = [P^T, -P^T]`` with P of
    shape (rank, dim), so ``W_D relu(W_E x) = P^T relu(P x) - P^T relu(-P x) = P^T P x``: both signs
    of every code unit pass. With P's rows orthonormal (the start; kept when fixed) the path is a
    projection of gain 1 onto a rank-dimensional subspace, whatever the depth. Its parameters are
    P alone: at rank dim / 2 as many as the rectified dim / 2 coder's tied weight. ``identity``:
    P = I (rank = dim), the path is x itself, the residual connection: a control, not PNNH."""

    def __init__(self, dim: int, rank: int, trainable: bool = False, identity: bool = False) -> None:
        super().__init__()
        check_positive_int("rank", rank)
        if identity:
            projection = torch.eye(dim)
        else:
            if rank > dim:
                raise ValueError(f"rank: at most dim {dim} orthonormal rows, got {rank}")
            # orthonormal rows from the QR factors of a Gaussian matrix (the caller's RNG state)
            projection = torch.linalg.qr(torch.randn(dim, rank))[0].t().contiguous()
        self.projection = nn.Parameter(projection, requires_grad=trainable)

    def forward(self, x: Tensor) -> Tensor:
        p = self.projection
        code = F.relu(torch.cat([F.linear(x, p), F.linear(x, -p)], dim=-1))
        return F.linear(code, torch.cat([p.t(), -p.t()], dim=1))


class Sublayer(CoderUser):
    """``scale * body(LN(x))`` (``scale``: a LayerScale vector where given, else 1), plus ``x``
    (residual) or plus the coder's path of ``x`` (pnnh: a rectified PNNHCoder or a SignedCoder)."""

    def __init__(
        self,
        body: nn.Module,
        dim: int,
        residual: bool,
        coder: Optional[PNNHCoder],
        signed: Optional[SignedCoder] = None,
        layer_scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.body = body
        self.residual = residual
        self.coder = coder
        self.signed = signed
        self.scale = None if layer_scale is None else nn.Parameter(torch.full((dim,), layer_scale))
        if coder is not None:
            coder.attach()

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(self.norm(x))
        if self.scale is not None:
            out = out * self.scale
        if self.residual:
            return x + out
        if self.coder is not None:
            weights = self.coder.tensors()  # with the shared coder's gradient averaging
            code = F.relu(F.linear(x, weights.encoder_weight, weights.encoder_bias))
            return out + F.linear(code, weights.decoder())
        if self.signed is not None:
            return out + self.signed(x)
        return out


class Block(nn.Module):
    def __init__(self, attention: Sublayer, mlp: Sublayer) -> None:
        super().__init__()
        self.attention = attention
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.attention(x))


class VisionTransformer(nn.Module):
    """Patch embedding (a strided conv), learned position embeddings, ``depth`` blocks, a final
    LayerNorm, mean pooling over the tokens (no class token) and a linear head."""

    def __init__(
        self,
        variant: str = "residual",
        *,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        coder_channels: Optional[int] = None,
        coder_init: str = DEFAULT_CODER_INIT,
        coder_trainable: bool = False,
        coder_kind: str = "rectified",
        coder_sublayers: str = "both",
        layer_scale: Optional[float] = None,
    ) -> None:
        """``coder_kind`` (pnnh): "rectified", the PNNHCoder ``W_D relu(W_E x + b_E)``; "signed", a
        SignedCoder of rank ``coder_channels`` (dim / 2 by default); "identity", the full-width
        control P = I (the residual connection itself; not PNNH). ``coder_sublayers`` (pnnh): "both",
        or "mlp" (the attention sublayers keep their residual connections). ``layer_scale``: every
        sublayer's output scaled by a learned per-channel vector starting at this value (LayerScale;
        None: none)."""
        super().__init__()
        self.variant = check_variant(variant)
        if coder_kind not in ("rectified", "signed", "identity"):
            raise ValueError(
                f"coder_kind: expected 'rectified', 'signed' or 'identity', got {coder_kind!r}"
            )
        if coder_sublayers not in ("both", "mlp"):
            raise ValueError(f"coder_sublayers: expected 'both' or 'mlp', got {coder_sublayers!r}")
        sizes = {"image_size": image_size, "patch_size": patch_size, "dim": dim, "depth": depth,
                 "heads": heads, "num_classes": num_classes}  # fmt: skip
        for name, value in sizes.items():
            check_positive_int(name, value)
        if image_size % patch_size:
            raise ValueError(
                f"patch_size: {patch_size} must divide image_size {image_size} (the images are cut "
                "into whole patches)"
            )
        self.image_size = image_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        coders: list[Optional[PNNHCoder]] = [None, None]
        signed: list[Optional[SignedCoder]] = [None, None]
        if variant == "pnnh":
            code = default_code_channels(dim) if coder_channels is None else coder_channels
            if coder_kind == "rectified" and code > 0:
                coders = [
                    PNNHCoder(dim, code, dim, tied=True, init=coder_init, trainable=coder_trainable)
                    for _ in range(2)
                ]
            elif coder_kind != "rectified":
                signed = [
                    SignedCoder(dim, dim if coder_kind == "identity" else code, coder_trainable,
                                identity=coder_kind == "identity")
                    for _ in range(2)
                ]  # fmt: skip
        residual = variant == "residual"
        attention_residual = residual or (variant == "pnnh" and coder_sublayers == "mlp")
        if attention_residual and not residual:
            coders[0], signed[0] = None, None
        hidden = round(dim * mlp_ratio)
        self.blocks = nn.Sequential(
            *(
                Block(
                    Sublayer(
                        Attention(dim, heads), dim, attention_residual, coders[0], signed[0], layer_scale
                    ),
                    Sublayer(MLP(dim, hidden), dim, residual, coders[1], signed[1], layer_scale),
                )
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"input: expected {self.image_size}x{self.image_size} images, got {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def vit(variant: str = "residual", preset: Optional[str] = None, **kwargs) -> VisionTransformer:
    """A ViT: ``preset`` "tiny" or "small" sets dim, depth and heads (keywords override them)."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {tuple(PRESETS)} or None, got {preset!r}")
        dim, depth, heads = PRESETS[preset]
        kwargs = {"dim": dim, "depth": depth, "heads": heads, **kwargs}
    return VisionTransformer(variant, **kwargs)


def vit_tiny(variant: str = "residual", **kwargs) -> VisionTransformer:
    return vit(variant, "tiny", **kwargs)


def vit_small(variant: str = "residual", **kwargs) -> VisionTransformer:
    return vit(variant, "small", **kwargs)
