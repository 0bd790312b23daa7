"""STG, spatiotemporal skip guidance (Hyung et al., CVPR 2025, arXiv 2411.18664; official code:
junhahyung/STGuidance, read at commit df04da05d5631e577fedb7e58eff6ddb4ffa4984 and, for STG-A and SVD, at
3dc4316 (``diffusers/*/pipeline_stg_*.py``)).

A video model guides itself with a weaker version of itself, made by skipping spatiotemporal layers in a
perturbed copy of the conditional branch:

* **STG-A** (``mode="attention"``): the self-attention map of the chosen sites becomes the identity (the output
  is V), PAG's perturbation, on spatial, temporal or full 3-D (spatiotemporal) attention (``kind``). On the joint
  sites of CogVideoX, Mochi and HunyuanVideo it follows pagkit's joint convention (video queries attend only to
  themselves among the video tokens and keep the text; the official CogVideoX processor instead masks the
  first N_video tokens of its [text; video] sequence, i.e. the wrong block).
* **STG-R** (``mode="residual"``): the chosen blocks return their inputs (``routing.SKIP``, as SLG): the
  official ``forward_with_stg``, which restores the perturbed rows' hidden and text states after the block.

ε̃ = ε_u + w(ε_c − ε_u) + s·(ε_c − ε_ptb), ε_ptb the conditional prediction of the perturbed model (without CFG:
ε_c + s(ε_c − ε_ptb), the official HunyuanVideo code). That is the official Mochi, CogVideoX and LTX code:
``noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond) + stg_scale * (noise_pred_text -
noise_pred_perturb)``. ``scale`` is s, the official ``stg_scale``; 0 is off. (The official Wan2.1 pipeline
differs: its perturbed branch reads the *negative* prompt and contrasts the CFG output with it,
ε̃_cfg + s(ε̃_cfg − ε_ptb(∅)); pagkit uses the formula above on Wan too.)

**Rescaling** (``rescale=φ``, the official ``do_rescaling``, whose ``rescaling_scale`` is 0.7): with
ε̃ the guided prediction above, factor = φ·std(ε_c)/std(ε̃) + (1 − φ) and ε̃ ← factor·ε̃. This is guidance
rescale (``rescale_guidance``, Lin et al. 2023) with ε_c as reference; pagkit takes the std per sample, the
official code over the whole batch (the same at batch 1, the official scripts' setting). It applies on the steps
where STG acts (the official code also rescales plain-CFG steps when ``do_rescaling`` is on).

**Defaults** are the official code's (its inference scripts, all STG-R, ``stg_scale = 1.0``, no rescaling), one
block per family (``DEFAULT_BLOCKS``): Mochi block 34, CogVideoX 11 (CogVideoX-2b), HunyuanVideo double-stream
block 2, LTX-Video 19, Wan 2 (the Wan pipeline's ``skip_guidance_block_idxs``; its script uses s = 2).
AnimateDiff has no official default: give ``layers`` (the official SVD example: STG-A on the first up block's
spatial sites at s = 2 and its temporal ones at s = 0.5, two terms here, with rescaling).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..perturb import Identity, Perturbation
from ..routing import SKIP
from .base import Contrast, ContrastTerm, _check_number, rescale_guidance
from .pag import attention_contrast
from .slg import _items, check_blocks, resolve_blocks

MODES = ("attention", "residual")
KINDS = ("spatial", "temporal", "spatiotemporal")

# family (backend name) → the official code's default stg_applied_layers_idx (block indices)
DEFAULT_BLOCKS = {"mochi": [34], "cogvideox": [11], "hunyuan_video": [2], "ltx": [19], "wan": [2]}


@dataclass
class STG(ContrastTerm):
    """Spatiotemporal Skip Guidance (Hyung et al. 2025): ε̃ = CFG + s(ε_c − ε_ptb), ε_ptb with ``layers`` skipped.

    ``layers``: block indices (the official ``stg_applied_layers_idx``, into ``Backend.skip_blocks``), block
    names, or layer selections (``"blocks.11"``, ``"mid"``, globs); None: the family's official default.
    ``mode``: ``"residual"`` (STG-R, the chosen blocks return their input; the official default) or
    ``"attention"`` (STG-A, the self-attention of the sites in them becomes the identity).
    ``kind``: only sites (STG-A) or blocks holding sites (STG-R) of that kind, ``"spatial"``, ``"temporal"`` or
    ``"spatiotemporal"``; None: every site the layers select.
    ``rescale``: φ of the std rescaling of ε̃ towards ε_c (0 = off; the official ``do_rescaling`` is 0.7).
    """

    scale: float = 1.0
    layers: int | str | tuple | list | None = None
    mode: str = "residual"
    kind: str | None = None
    rescale: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"STG mode must be one of {', '.join(map(repr, MODES))} (STG-A, STG-R), got {self.mode!r}")
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"STG kind must be None or one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")
        _check_number("STG rescale", self.rescale, low=0.0)
        if self.rescale > 1.0:
            raise ValueError(f"STG rescale must be in [0, 1] (the official value is 0.7), got {self.rescale!r}")
        if self.layers is not None:
            check_blocks("STG", self.layers)
        if self.fold and self.rescale:
            raise ValueError("STG(fold=True) has no ε̃ of its own to rescale: rescale cannot be set with it")

    def make_perturbation(self) -> Perturbation:
        return Identity()

    def bind(self, key, context):
        model, backend = context.model, context.backend
        layers = self.layers
        if layers is None:
            if backend.name not in DEFAULT_BLOCKS:
                raise ValueError(f"STG has no default layers for {type(model).__name__} ({backend.name} family; "
                                 f"defaults exist for {', '.join(DEFAULT_BLOCKS)}): pass layers=...")
            layers = DEFAULT_BLOCKS[backend.name]
        if self.mode == "residual":
            blocks = resolve_blocks(model, backend, layers, kind=self.kind)
            return RescaledContrast(self, key, {name: SKIP for name in blocks})
        blocks = backend.skip_blocks(model) or []
        selection = []
        for item in _items(layers):  # a block index stands for the block's sites, as the official indices do
            if isinstance(item, int):
                resolve_blocks(model, backend, [item])  # one clear error for an index out of range
                item = f"{blocks[item]}.*"  # the sites inside block ``item``
            selection.append(item)
        return attention_contrast(self, key, context, layers=selection, contrast=RescaledContrast)


class RescaledContrast(Contrast):
    """s(ε_c − ε_ptb), then, with ``rescale`` φ > 0, ε̃ ← ε̃·(φ·std(ε_c)/std(ε̃) + 1 − φ) (per sample)."""

    def __init__(self, term: STG, key: str, patches: dict):
        super().__init__(term, key, patches)
        self.adjusts = term.rescale > 0

    def adjust(self, scale, guided, step):
        return rescale_guidance(guided, step.eps["cond"], self.term.rescale)
