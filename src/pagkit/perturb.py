"""What a perturbed attention computes: pure maths on (q, k, v, token layout), no model code.

Attention is softmax(QKᵀ/√d)·V over a sequence that holds image tokens, and for
joint (MMDiT) and single-stream sites text tokens too. ``routing.py`` hands the
q, k, v that the model's own processor built (after its QK-norm and RoPE) to a
``Perturbation`` for the perturbed rows only:

==============  =====================================================================
``identity``    PAG: the attention map is the identity, so the output is V.
``soft``        SoftPAG / head-level PAG (HeadHunter, ``SoftIdentity``; PAG's ``strength``
                and ``heads``): A' = (1 − α)A + αI on the chosen heads.
``blur``        SEG: the queries are blurred by a 2-D Gaussian of width σ over the real
                H×W token grid (equivalent to blurring QKᵀ along the query axes); on a
                video grid F×H×W a separable 3-D Gaussian (``per_frame=True``: within
                each frame only).
``uniform``     SEG's σ = ∞ limit: every query is the mean query, so every token
                attends with the same weights.
``mask``        PAG ablation: each entry of the attention map is dropped with
                probability p (logit −∞; the diagonal is always kept).
``noise``       PAG ablation: Gaussian noise of std ``std`` added to the logits.
==============  =====================================================================

On a joint sequence the perturbation acts on the image→image block only (diffusers'
SD3 convention): image queries attend, among image tokens, only as the perturbation
says (identity: only to themselves), keep their attention to every text token, and
text queries are untouched. ``Identity(strict=True)`` is the strict alternative: the
image tokens' output is their own V. SEG blurs image queries only, over the image grid.
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
    Half-precision input (bf16, fp16) is blurred in float32 and returned in its own dtype.
    """
    if kernel_size is None:
        kernel_size = seg_kernel_size(sigma)
    if img.dtype in (torch.float16, torch.bfloat16):
        return gaussian_blur(img.float(), sigma, kernel_size).to(img.dtype)
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


def gaussian_blur_video(img: torch.Tensor, sigma: float, per_frame: bool = False) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, F, H, W): each frame as ``gaussian_blur``, then along F (unless
    ``per_frame``) with the same reflect padding and kernel clamping; half precision is blurred in float32."""
    if img.dtype in (torch.float16, torch.bfloat16):
        return gaussian_blur_video(img.float(), sigma, per_frame).to(img.dtype)
    b, c, f, h, w = img.shape
    out = gaussian_blur(img.transpose(1, 2).reshape(b * f, c, h, w), sigma).reshape(b, f, c, h, w).transpose(1, 2)
    k = min(seg_kernel_size(sigma), f if f % 2 == 1 else f - 1)
    if per_frame or k <= 1:
        return out
    kernel = gaussian_kernel_1d(sigma, k, dtype=img.dtype, device=img.device)
    line = out.permute(0, 1, 3, 4, 2).reshape(-1, 1, f)  # every (channel, position) as one line over frames
    line = F.conv1d(F.pad(line, (k // 2, k // 2), mode="reflect"), kernel.view(1, 1, k))
    return line.reshape(b, c, h, w, f).permute(0, 1, 4, 2, 3)


@dataclass(frozen=True)
class TokenLayout:
    """Where the image tokens of one attention call sit in its sequence, and their grid.

    ``image``: the positions [start, stop) of the image tokens; every other position is text (or
    another non-image stream). ``grid``: (H, W) of the image tokens, row-major, where known; for video
    (F, H, W), frame-major (a spatial site's sequence is one frame, 1×H×W; a temporal site's one position, F×1×1).
    """

    length: int
    image: tuple[int, int]
    grid: tuple[int, ...] | None = None

    @classmethod
    def self_attention(cls, length: int, grid: tuple[int, ...] | None = None) -> "TokenLayout":
        return cls(length, (0, length), grid)

    @property
    def is_self(self) -> bool:
        return self.image == (0, self.length)

    @property
    def num_image(self) -> int:
        return self.image[1] - self.image[0]

    def text_index(self, device=None) -> torch.Tensor:
        a, b = self.image
        return torch.cat([torch.arange(0, a, device=device), torch.arange(b, self.length, device=device)])


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """An SDPA mask as an additive float mask (bool: True = attend)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _take(mask: torch.Tensor | None, dim: int, index) -> torch.Tensor | None:
    """Rows (dim=-2) or columns (dim=-1) of a broadcastable mask; a size-1 axis stays as it is."""
    if mask is None or mask.shape[dim] == 1:
        return mask
    if isinstance(index, tuple):
        return mask.narrow(dim, index[0], index[1] - index[0])
    return mask.index_select(dim, index.to(mask.device))


def _own_key_entries(mask: torch.Tensor) -> torch.Tensor:
    """The (query i, key i) entries of a broadcastable image×image mask, shaped (…, N or 1, 1)."""
    if mask.shape[-2] > 1 and mask.shape[-1] > 1:
        return mask.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    return mask.transpose(-1, -2) if mask.shape[-1] > 1 else mask


def sdpa(q, k, v, attn_mask=None, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


@dataclass
class Perturbation:
    """Base class: what replaces softmax(QKᵀ/√d)·V on the perturbed rows.

    ``attend(q, k, v, layout, attn_mask, scale)`` takes (B, heads, S, d) tensors as SDPA does.
    Subclasses say how the image→image block changes; on a joint sequence the text queries and the
    image queries' attention to text are kept, as the module docstring says.
    """

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
               attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        if layout.is_self:
            return self.attend_image(q, k, v, layout.grid, attn_mask, scale)
        a, b = layout.image
        text = layout.text_index(q.device)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        # text queries: untouched
        out[:, :, text] = sdpa(q[:, :, text], k, v, _take(attn_mask, -2, text), scale)
        out[:, :, a:b] = self.attend_joint_image(q, k, v, layout, _take(attn_mask, -2, (a, b)), scale)
        return out

    def attend_image(self, q, k, v, grid, attn_mask, scale):
        """Self-attention among image tokens only."""
        raise NotImplementedError

    def attend_joint_image(self, q, k, v, layout, attn_mask, scale):
        """Outputs of the image queries of a joint sequence (``attn_mask``: the image query rows)."""
        a, b = layout.image
        bias = self.image_bias((q.shape[0], q.shape[1], b - a, b - a), q)
        full = _additive(attn_mask, q.dtype)
        if full is None:
            full = q.new_zeros(1, 1, 1, layout.length)
        full = full.expand(*full.shape[:-2], b - a, layout.length).clone()
        full[..., a:b] = full[..., a:b] + bias
        return sdpa(q[:, :, a:b], k, v, full, scale)

    def image_bias(self, shape, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Identity(Perturbation):
    """PAG: softmax(QKᵀ/√d) → I, so the output is V.

    On a joint sequence (default): each image query attends, among image tokens, only to itself, and still to
    every text token (diffusers' SD3 PAG convention). ``strict=True``: an image token's output is its own V.
    """

    strict: bool = False

    def attend_image(self, q, k, v, grid, attn_mask, scale):
        return v

    def attend_joint_image(self, q, k, v, layout, attn_mask, scale):
        a, b = layout.image
        qi, vi = q[:, :, a:b], v[:, :, a:b]
        if self.strict:
            return vi
        # softmax over {own key} ∪ {text keys}: O(N·T), never the N×N image block
        text = layout.text_index(q.device)
        s = scale if scale is not None else q.shape[-1] ** -0.5
        own = (qi * k[:, :, a:b]).sum(-1, keepdim=True) * s  # (B, H, N, 1)
        to_text = qi @ k[:, :, text].transpose(-1, -2) * s  # (B, H, N, T)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None:  # its rows are the image queries already
            own = own + _own_key_entries(_take(mask, -1, (a, b)))
            to_text = to_text + _take(mask, -1, text)
        weights = torch.softmax(torch.cat([own, to_text], dim=-1).float(), dim=-1).to(v.dtype)
        return weights[..., :1] * vi + weights[..., 1:] @ v[:, :, text]


@dataclass
class SoftIdentity(Perturbation):
    """SoftPAG and head-level PAG (Ahn et al. 2025, "HeadHunter", arXiv 2506.10978): A' = (1 − α)A + αI.

    The attention output is linear in the map, so on each chosen head O' = (1 − α)·softmax(QKᵀ/√d)V + α·O_I,
    with O_I the output of ``Identity(strict)`` (on a joint sequence its convention: image queries attend only to
    themselves among image tokens and still to the text; text queries untouched); heads not chosen keep O.
    ``strength`` is α ∈ [0, 1] (the official code's ``@scale=u``; 1 = PAG); ``heads``: indices into dim 1 of the
    (B, heads, S, d) tensors the site's processor hands to attention (query heads under grouped-query attention),
    None = every head (the official ``perturb_heads``). Reference: cvlab-kaist/HeadHunter, README and
    ``diffusers/src/diffusers/models/attention_processor.py`` (commit 3828d1c).
    """

    strength: float = 1.0
    heads: tuple[int, ...] | None = None
    strict: bool = False

    def __post_init__(self):
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or \
                not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"PAG strength (SoftPAG's α) must be a number in [0, 1], got {self.strength!r}")
        if self.heads is not None:
            heads = tuple(self.heads)
            if not heads or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in heads) or \
                    len(set(heads)) != len(heads):
                raise ValueError(f"PAG heads must be a non-empty list of distinct head indices (ints >= 0) or "
                                 f"None (every head), got {self.heads!r}")
            self.heads = heads

    def attend(self, q, k, v, layout, attn_mask=None, scale=None):
        identity = Identity(strict=self.strict).attend(q, k, v, layout, attn_mask, scale)
        if self.heads is None and self.strength == 1.0:
            return identity
        return self.mix(sdpa(q, k, v, attn_mask, scale), identity)

    def mix(self, plain: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """(1 − α)·plain + α·identity on the chosen heads (dim 1), ``plain`` elsewhere."""
        if self.heads is not None and max(self.heads) >= plain.shape[1]:
            raise ValueError(f"PAG heads {list(self.heads)}: this attention has {plain.shape[1]} heads "
                             f"(valid 0–{plain.shape[1] - 1})")
        a = self.strength
        if self.heads is None:
            return identity if a == 1.0 else (1 - a) * plain + a * identity
        index = torch.tensor(self.heads, device=plain.device)
        chosen = identity.index_select(1, index)
        if a != 1.0:
            chosen = (1 - a) * plain.index_select(1, index) + a * chosen
        return plain.index_copy(1, index, chosen.to(plain.dtype))


@dataclass
class QueryBlur(Perturbation):
    """SEG: blur Q with a Gaussian of width ``sigma`` over the H×W token grid; σ = ∞ (or > 9999) → mean query.

    On a video grid F×H×W the Gaussian is 3-D (separable); ``per_frame=True`` blurs within each frame only
    (σ = ∞: the mean query of each frame). On a joint sequence only the image queries are blurred (over the image
    grid); they still attend to every key.
    """

    sigma: float = float("inf")
    per_frame: bool = False

    def __post_init__(self):
        if not (self.sigma > 0):  # also rejects NaN
            raise ValueError(f"SEG sigma must be a positive number or inf, got {self.sigma!r}")

    def blur_queries(self, q: torch.Tensor, grid: tuple[int, ...] | None) -> torch.Tensor:
        b, heads, n, d = q.shape
        if grid is not None and len(grid) == 3:
            f, h, w = _video_grid(grid, n)
            if self.sigma > INFINITE_SIGMA:
                if not self.per_frame:
                    return q.mean(dim=-2, keepdim=True).expand_as(q)
                return q.unflatten(2, (f, h * w)).mean(dim=3, keepdim=True).expand(b, heads, f, h * w, d) \
                    .reshape(q.shape)
            img = q.permute(0, 1, 3, 2).reshape(b, heads * d, f, h, w)
            img = gaussian_blur_video(img, self.sigma, self.per_frame)
            return img.reshape(b, heads, d, n).permute(0, 1, 3, 2)
        if self.sigma > INFINITE_SIGMA:
            return q.mean(dim=-2, keepdim=True).expand_as(q)
        h, w = _grid_or_square(grid, n)
        img = q.permute(0, 1, 3, 2).reshape(b, heads * d, h, w)
        img = gaussian_blur(img, self.sigma)
        return img.reshape(b, heads, d, n).permute(0, 1, 3, 2)

    def attend_image(self, q, k, v, grid, attn_mask, scale):
        return sdpa(self.blur_queries(q, grid), k, v, attn_mask, scale)

    def attend_joint_image(self, q, k, v, layout, attn_mask, scale):
        a, b = layout.image
        return sdpa(self.blur_queries(q[:, :, a:b], layout.grid), k, v, attn_mask, scale)


@dataclass
class Uniform(QueryBlur):
    """SEG's σ = ∞ limit as its own perturbation: every query is the mean query."""

    sigma: float = float("inf")


@dataclass
class _RandomLogitBias(Perturbation):
    """Attention with a random additive bias on the image→image logits, drawn from a seeded CPU generator."""

    seed: int = field(default=0, kw_only=True)
    generator: torch.Generator | None = field(default=None, repr=False, compare=False, kw_only=True)

    def bias(self, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def image_bias(self, shape, like):
        if self.generator is None:
            self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        return self.bias(shape).to(like)

    def attend_image(self, q, k, v, grid, attn_mask, scale):
        bias = self.image_bias((q.shape[0], q.shape[1], q.shape[2], k.shape[-2]), q)
        if attn_mask is not None:
            bias = bias + _additive(attn_mask, q.dtype)
        return sdpa(q, k, v, bias, scale)


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


def _video_grid(grid: tuple[int, int, int], n: int) -> tuple[int, int, int]:
    if grid[0] * grid[1] * grid[2] != n:
        raise ValueError(f"the video token grid {'x'.join(map(str, grid))} does not hold the {n} tokens of this "
                         "attention; SEG's blur needs the real F×H×W")
    return grid


def _grid_or_square(grid: tuple[int, int] | None, n: int) -> tuple[int, int]:
    if grid is not None and grid[0] * grid[1] == n:
        return grid
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"cannot tell the token grid of a self-attention layer with {n} tokens "
                         f"(recorded grid: {grid}); SEG's blur needs the real H×W")
    return side, side
