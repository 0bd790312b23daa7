"""What a perturbed self-attention computes.

Self-attention is softmax(QKᵀ/√d)·V. Each perturbation here replaces one part of
it, on the batch rows routed to it (see ``attach.py``):

==============  =====================================================================
``identity``    PAG: the attention map is the identity, so the output is V.
``blur``        SEG: the queries are blurred by a 2-D Gaussian of width σ over the real
                H×W token grid (equivalent to blurring QKᵀ along the query axes).
``uniform``     SEG's σ = ∞ limit: every query is the mean query, so every token
                attends with the same weights.
``mask``        PAG ablation: each entry of the attention map is dropped with
                probability p (logit −∞; the diagonal is always kept).
``noise``       PAG ablation: Gaussian noise of std ``std`` added to the logits.
==============  =====================================================================

``perturbed_self_attention`` mirrors diffusers' ``AttnProcessor2_0`` step by step
(spatial norm, group norm, Q/K/V, q/k norms, output projection, residual, rescale)
so that a perturbation changes exactly one thing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

INFINITE_SIGMA = 9999.0  # as in the official SEG code: σ above this means σ = ∞


def gaussian_kernel_1d(sigma: float, kernel_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(dtype=dtype, device=device)


def seg_kernel_size(sigma: float) -> int:
    """ceil(6σ) + 1, forced odd (the official SEG rule)."""
    k = math.ceil(6 * sigma) + 1
    return k if k % 2 == 1 else k - 1


def gaussian_blur(img: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding.

    The kernel is clamped to the largest odd size each axis can reflect-pad, so
    small or non-square grids work (SEG's official code clamps the same way).
    """
    if kernel_size is None:
        kernel_size = seg_kernel_size(sigma)
    out = img
    for axis, length in ((-1, img.shape[-1]), (-2, img.shape[-2])):
        k = min(kernel_size, length if length % 2 == 1 else length - 1)
        if k <= 1:
            continue
        kernel = gaussian_kernel_1d(sigma, k, dtype=img.dtype, device=img.device)
        c = out.shape[1]
        if axis == -1:
            out = F.pad(out, (k // 2, k // 2, 0, 0), mode="reflect")
            out = F.conv2d(out, kernel.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
        else:
            out = F.pad(out, (0, 0, k // 2, k // 2), mode="reflect")
            out = F.conv2d(out, kernel.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return out


@dataclass
class Perturbation:
    """Base class. ``needs_qk`` is False when the output depends on V alone (no Q, K or softmax is computed)."""

    needs_qk = True

    def attend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, grid: tuple[int, int] | None,
               scale: float, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Identity(Perturbation):
    """PAG: softmax(QKᵀ/√d) → I, so the output is V."""

    needs_qk = False

    def attend(self, q, k, v, grid, scale, attention_mask):
        return v


@dataclass
class QueryBlur(Perturbation):
    """SEG: blur Q with a Gaussian of width ``sigma`` over the H×W token grid; σ = ∞ (or > 9999) → mean query."""

    sigma: float = float("inf")

    def __post_init__(self):
        if not (self.sigma > 0):  # also rejects NaN
            raise ValueError(f"SEG sigma must be a positive number or inf, got {self.sigma!r}")

    def blur_queries(self, q: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        if self.sigma > INFINITE_SIGMA:
            return q.mean(dim=-2, keepdim=True).expand_as(q)
        b, heads, n, d = q.shape
        h, w = _grid_or_square(grid, n)
        img = q.permute(0, 1, 3, 2).reshape(b, heads * d, h, w)
        img = gaussian_blur(img, self.sigma)
        return img.reshape(b, heads, d, n).permute(0, 1, 3, 2)

    def attend(self, q, k, v, grid, scale, attention_mask):
        q = self.blur_queries(q, grid)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=scale)


@dataclass
class Uniform(QueryBlur):
    """SEG's σ = ∞ limit as its own perturbation: every query is the mean query."""

    sigma: float = float("inf")


@dataclass
class _RandomLogitBias(Perturbation):
    """Attention with a random additive bias on the logits, drawn from a seeded CPU generator."""

    seed: int = field(default=0, kw_only=True)
    generator: torch.Generator | None = field(default=None, repr=False, compare=False, kw_only=True)

    def bias(self, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def attend(self, q, k, v, grid, scale, attention_mask):
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        bias = self.bias((q.shape[0], q.shape[1], q.shape[2], k.shape[-2])).to(q)
        if attention_mask is not None:
            bias = bias + attention_mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


@dataclass
class RandomMask(_RandomLogitBias):
    """Drop each attention-map entry with probability ``p`` (logit −∞); the diagonal is always kept, so no row is
    empty."""

    p: float = 0.5

    def __post_init__(self):
        if not (0.0 <= self.p < 1.0):
            raise ValueError(f"mask probability p must be in [0, 1), got {self.p!r}")

    def bias(self, shape):
        drop = torch.rand(shape, generator=self.generator) < self.p
        drop &= ~torch.eye(shape[-2], shape[-1], dtype=torch.bool)
        return torch.zeros(shape).masked_fill_(drop, float("-inf"))


@dataclass
class LogitNoise(_RandomLogitBias):
    """Add N(0, std²) to the attention logits QKᵀ/√d."""

    std: float = 1.0

    def __post_init__(self):
        if not (self.std >= 0 and math.isfinite(self.std)):
            raise ValueError(f"logit noise std must be a finite number >= 0, got {self.std!r}")

    def bias(self, shape):
        return self.std * torch.randn(shape, generator=self.generator)


PERTURBATIONS = {"identity": Identity, "blur": QueryBlur, "uniform": Uniform, "mask": RandomMask, "noise": LogitNoise}


def make_perturbation(name: str, **options) -> Perturbation:
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose one of {sorted(PERTURBATIONS)}")
    return PERTURBATIONS[name](**options)


def _grid_or_square(grid: tuple[int, int] | None, n: int) -> tuple[int, int]:
    if grid is not None and grid[0] * grid[1] == n:
        return grid
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"cannot tell the token grid of a self-attention layer with {n} tokens "
                         f"(recorded grid: {grid}); SEG's blur needs the real H×W")
    return side, side


def perturbed_self_attention(attn, hidden_states: torch.Tensor, perturbation: Perturbation,
                             grid: tuple[int, int] | None = None, attention_mask: torch.Tensor | None = None,
                             temb: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers ``AttnProcessor2_0`` for self-attention, with the attention step replaced by ``perturbation``."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        grid = (height, width)
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch, n_tokens, _ = hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, n_tokens, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    value = attn.to_v(hidden_states)
    head_dim = value.shape[-1] // attn.heads
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    query = key = None
    if perturbation.needs_qk:
        query = attn.to_q(hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = attn.to_k(hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
    else:
        query = value  # only its shape is read
    # scale=None: SDPA's default 1/√d, exactly as AttnProcessor2_0 does
    out = perturbation.attend(query, key, value, grid, None, attention_mask)

    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(value.dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor
