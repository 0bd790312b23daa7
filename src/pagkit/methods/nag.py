"""NAG, normalized attention guidance (Chen, Bandyopadhyay, Zou & Song, NeurIPS 2025, arXiv 2505.21179).

At each chosen attention layer, with Z⁺ its output under the positive condition and Z⁻ under the negative one
(the same image queries; keys and values from the positive or the negative prompt):

    Z̃ = Z⁺ + φ·(Z⁺ − Z⁻)                      extrapolation in attention space
    Ẑ = Z̃ · min(1, τ·‖Z⁺‖₁ / ‖Z̃‖₁)            L1 norm over the feature dim (all heads) of each token
    Z = α·Ẑ + (1 − α)·Z⁺                      refinement

and Z replaces Z⁺ before the layer's output projection. ε_c itself is then the NAG-guided prediction: NAG
adds no term to ε̃, works without a CFG pass (few-step and distilled models), and under CFG gives
ε̃ = ε_u + w(ε_c^NAG − ε_u), as the official pipelines do.

**Scale.** ``scale`` is the paper's φ; φ = 0 is off (Z = Z⁺). The official code's ``nag_scale`` is φ + 1 (it
computes Z̃ = s·Z⁺ − (s − 1)·Z⁻ and is off at s = 1): its README's ``nag_scale=5`` for Flux-schnell is φ = 4.

**Reference implementation**: ChenDarYen/Normalized-Attention-Guidance. Read there:

* which layers: UNets (SDXL, ``nag/pipeline_sdxl_nag.py`` @ 8f2aa4f) and Wan: every cross-attention ``attn2``;
  SD3 and Flux: every joint (and Flux's single-stream) attention, where only the image tokens' outputs are mixed
  and the text tokens keep their own (``src/attention_flux_nag.py`` @ 69159ca). The default ``layers=None``
  selects exactly these: the backend's ``cross_sites`` and its joint and single-stream sites.
* the negative rows: the official batch is extended with the negative prompt's text only. The image stream is
  shared: Z⁻ is computed from the guided image tokens' queries, and (joint models) the negative text tokens are
  carried through the blocks on their own. pagkit runs the negative rows as one more branch of the batched
  forward, fed the negative inputs, and at every NAG layer writes the mix Z into the image tokens of *both*
  the conditional and the negative rows (``routing.CrossRows``). With every layer chosen and a negative that
  differs from c only in the text inputs, the negative rows' image stream is the guided one, as in the
  official code; with a subset of the layers, the negative rows run the model on their own in between.
* defaults: τ = 2.5 everywhere; α = 0.5 (SDXL), 0.125 (SD3), 0.25 (Flux, Wan) (``alpha=None`` picks the
  family's); ``nag_end`` (NAG until t < (1 − nag_end)·1000) is pagkit's ``stop`` (by step index, not timestep).
* the norm: L1 in the paper and in the official SDXL, SD3 and Wan processors; the first Flux processor
  (@ 69159ca) used the L2 norm. pagkit uses L1 on every family, Flux included (a deliberate deviation from that
  file; on Flux the two norms give measurably different predictions).

**The negative inputs.** ``negative={"encoder_hidden_states": neg_embeds, ...}`` replaces those inputs of the
conditional ones in the negative rows (a tensor of one row serves every sample; the text must have the
conditional text's length). ``negative=None`` takes the text inputs (``encoder_hidden_states`` and its mask)
from the caller's ``uncond``: a pipeline's negative prompt under ``pagkit.attach``, as the official pipelines
default to it. Pooled text embeddings (so the modulation, temb) stay the positive ones unless ``negative`` names
them. The official SD3 pipeline keeps them too. Its Flux pipeline (``src/pipeline_flux_nag.py`` @ 69159ca) gives
the negative prompt's pooled embedding to the negative rows: to their text tokens in the double-stream blocks and,
in the single-stream blocks, to their image tokens as well, whose stream then drifts from the guided one. pagkit
deviates on purpose: the negative rows differ from the conditional ones in the text inputs only, so Z⁻ comes from
the guided image tokens at every layer (the paper's Z⁻ from the same queries). With the negative's pooled embedding
equal to the positive one, pagkit equals the official Flux code (L1 norm, above). Naming ``pooled_projections`` in
``negative`` modulates the negative rows wholly by it, their image stream included: that is neither the paper's
nor the official code's computation.

**With other terms.** CFG: yes (above). PAG, SEG, SAG, SLG: refused with one ValueError, because their branches
copy the conditional inputs but not NAG's mixing, so s(ε_c − ε̂) would contrast the NAG-guided ε_c against an
unguided copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import resolve_layers
from ..routing import CrossRows
from .base import Bound, Branch, GuidanceTerm, _check_number

TEXT_INPUTS = ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_mask")
FAMILY_ALPHA = {"unet": 0.5, "sd3": 0.125}  # the official pipelines' nag_alpha; 0.25 elsewhere (Flux, Wan)
DEFAULT_ALPHA = 0.25


def nag_mix(z_pos: torch.Tensor, z_neg: torch.Tensor, phi: float, tau: float, alpha: float) -> torch.Tensor:
    """Z = αẐ + (1 − α)Z⁺ with Z̃ = Z⁺ + φ(Z⁺ − Z⁻), Ẑ = Z̃·min(1, τ‖Z⁺‖₁/‖Z̃‖₁), on attention outputs of
    shape (rows, heads, tokens, d): the L1 norm is over heads and d, the feature dim of each token."""
    z_tilde = z_pos + phi * (z_pos - z_neg)
    n_pos = z_pos.abs().sum(dim=(1, 3), keepdim=True)
    n_tilde = z_tilde.abs().sum(dim=(1, 3), keepdim=True)
    cap = torch.where(n_tilde > 0, (tau * n_pos / n_tilde).clamp(max=1.0), torch.ones_like(n_tilde))
    return alpha * (z_tilde * cap) + (1 - alpha) * z_pos


@dataclass
class NAGMix(CrossRows):
    """The NAG patch at one layer: the conditional rows' image-token attention output Z⁺ and the negative rows'
    Z⁻ give Z (``nag_mix``), written into both (the image stream is shared, as in the official code)."""

    phi: float
    tau: float
    alpha: float

    def mix(self, onto, own):
        z = nag_mix(onto, own, self.phi, self.tau, self.alpha)
        return z, z


@dataclass
class NAG(GuidanceTerm):
    """Normalized attention guidance (Chen et al., NeurIPS 2025): negative prompts in attention space.

    ``scale``: the paper's φ (0 = off; the official ``nag_scale`` is φ + 1).
    ``tau``: τ, the cap on ‖Z̃‖₁/‖Z⁺‖₁ per token (official ``nag_tau`` 2.5); at least 1, so φ = 0 leaves Z⁺.
    ``alpha``: α in [0, 1], the share of the normalized Ẑ (official ``nag_alpha``); None: the official default
    of the model's family (SDXL 0.5, SD3 0.125, others 0.25).
    ``layers``: the attention layers to guide (names, globs or aliases over the model's cross-attention,
    joint and single-stream layers); None: all of them, as the official pipelines.
    ``negative``: the model inputs of the negative condition that replace the conditional ones, e.g.
    ``{"encoder_hidden_states": negative_embeds}``; None: the text inputs of the caller's ``uncond``.
    ``stop`` is the official ``nag_end``.
    """

    scale: float = 4.0
    tau: float = 2.5
    alpha: float | None = None
    layers: str | list[str] | None = None
    negative: dict | None = None

    unique = True
    rewrites_cond = True

    def __post_init__(self):
        super().__post_init__()
        _check_number("NAG tau", self.tau, low=1.0)
        if self.alpha is not None:
            _check_number("NAG alpha", self.alpha, low=0.0)
            if self.alpha > 1:
                raise ValueError(f"NAG alpha must be in [0, 1], got {self.alpha!r}")
        if self.negative is not None:
            if not isinstance(self.negative, dict) or not self.negative or \
                    not all(isinstance(k, str) for k in self.negative):
                raise ValueError("NAG negative must be a non-empty dict of model inputs, e.g. "
                                 f"{{'encoder_hidden_states': negative_embeds}}; got {self.negative!r}")
        if self.layers is not None and not isinstance(self.layers, (str, list, tuple)):
            raise ValueError(f"NAG layers must be a layer name, glob or alias, a list of them, or None; "
                             f"got {self.layers!r}")

    def bind(self, key, context):
        model, backend = context.model, context.backend
        candidates = backend.cross_sites(model) + [s for s in backend.sites(model) if s.kind in ("joint", "single")]
        if not candidates:
            raise ValueError(f"NAG needs layers where the text enters the image tokens (cross-attention, joint or "
                             f"single-stream attention); pagkit knows none in {type(model).__name__} "
                             f"({backend.name} family)")
        sites = [s.name for s in candidates] if self.layers is None else \
            resolve_layers(model, self.layers, among=candidates)
        alpha = FAMILY_ALPHA.get(backend.name, DEFAULT_ALPHA) if self.alpha is None else float(self.alpha)
        return BoundNAG(self, key, sites, alpha)


class BoundNAG(Bound):
    """One branch of negative-condition rows; its ``NAGMix`` rewrites the conditional rows at every layer."""

    def __init__(self, term: NAG, key: str, sites: list[str], alpha: float):
        super().__init__(term, key)
        self.sites, self.alpha = sites, alpha

    def branches(self, scale):
        mix = NAGMix(scale, self.term.tau, self.alpha)
        patches = {name: mix for name in self.sites}
        if self.term.negative is not None:
            return [Branch(self.key, "cond", patches, inputs=self.term.negative, onto="cond")]
        return [Branch(self.key, "cond", patches, inputs=self.uncond_text, onto="cond")]

    @staticmethod
    def uncond_text(inputs: dict) -> dict:
        """The text inputs of the caller's unconditional inputs (NAG's negative when ``negative=None``)."""
        uncond = inputs.get("uncond")
        text = {k: uncond[k] for k in TEXT_INPUTS if k in uncond} if uncond is not None else {}
        if not text:
            raise ValueError("NAG(negative=None) takes its negative prompt from the caller's unconditional inputs "
                             "(uncond=..., or a pipeline's negative prompt), but none with encoder_hidden_states "
                             "were given; pass NAG(negative={'encoder_hidden_states': negative_embeds})")
        return text

    def contribution(self, scale, step):
        return None  # ε_c is already the NAG-guided prediction
