"""Autoguidance (Karras et al., NeurIPS 2024, "Guiding a Diffusion Model with a Bad Version of Itself",
arXiv 2406.02507; reference: NVlabs/edm2 ``generate_images.py``, commit 4bf8162 "Autoguidance release").

Guide the model D₁ with a weaker version of itself D₀ (smaller, or trained for less long), under the **same**
condition c:

    D_w(x; σ, c) = w·D₁(x; σ, c) + (1 − w)·D₀(x; σ, c) = D₀ + w(D₁ − D₀)

EDM2's ``edm_sampler``: ``Dx = net(x, t, labels)``; ``ref_Dx = gnet(x, t, labels)``; ``ref_Dx.lerp(Dx, guidance)``,
and ``guidance == 1`` returns ``Dx`` without calling ``gnet``. The weights sum to one and ε, v and flow velocity
are affine in D with coefficients that depend on (x, σ) only, so the same combination holds for whatever the
model predicts. pagkit applies it to the model's own output:

    ε̃ = ε₀ + w(ε₁ − ε₀) = ε₁ + (w − 1)(ε₁ − ε₀)

``scale`` is Karras' w: 1 is off (``neutral = 1.0``); EDM2's presets use w = 1.7–2.9 (ImageNet-512,
conditional: 2.05–2.45).

**With CFG.** EDM2 uses autoguidance *instead of* CFG (its CFG presets are the same sampler with an
unconditional ``gnet``). With both, pagkit adds autoguidance's term to the CFG base:
ε̃ = ε_u + w_cfg(ε_c − ε_u) + (w − 1)(ε_c − ε_weak,c), the weak model called with the condition c.

**Not diffusers' AutoGuidance.** diffusers' ``guiders.AutoGuidance`` is another method: it drops layers of the
*same* model (``auto_guidance_layers``, ``dropout``) under the negative condition, i.e. a CFG variant closer to
SLG. This term is the paper's: a separate, weaker model.

**Cost.** The weak model has other weights, so it cannot join the main model's batched forward: it runs in one
pass of its own after it (``order = 1``), on the conditional rows only, once per step where w ≠ 1. The model
given as its own weak model is allowed: then ε_weak is ε_c itself, the term is zero, and nothing extra runs.
"""
from __future__ import annotations

import os

from dataclasses import dataclass, field

import torch

from ..backends import detect
from .base import Bound, GuidanceTerm

# config entries that fix what a model is called with and what it returns: a weak model must agree on them
INTERFACE_KEYS = (
    "in_channels", "sample_size",
    "num_class_embeds", "class_embed_type", "num_embeds_ada_norm",  # class conditioning (UNet, DiT)
    "cross_attention_dim", "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type",  # text (UNets)
    "projection_class_embeddings_input_dim",
    "joint_attention_dim", "pooled_projection_dim", "caption_channels", "text_embed_dim",  # text (transformers)
    "cap_feat_dim", "guidance_embeds",
)


@dataclass
class AutoGuidance(GuidanceTerm):
    """Autoguidance (Karras et al. 2024): ε̃ = ε_weak + w(ε − ε_weak), ``weak_model`` under the same condition.

    ``scale``: w (1 = off; EDM2's conditional ImageNet-512 presets 2.05–2.45). ``weak_model``: the guiding
    model D₀, a weaker version of the main one (fewer parameters or fewer training steps) of the same family
    and call convention, taking the same inputs and predicting the same quantity. It runs in eval mode (its
    modules' training flags are put back afterwards) and is never modified.
    With CFG: ε̃ = CFG + (w − 1)(ε_c − ε_weak,c).
    """

    scale: float = 2.0
    weak_model: torch.nn.Module | str | None = field(default=None, repr=False)
    """The weak model: a module, or a shipped model name / diffusers folder (loaded now, as ``pagkit.load``),
    which is how the command line gives it (``autoguidance:2,weak_model=fmnist-weak``)."""

    neutral = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.weak_model is None:
            raise ValueError("AutoGuidance needs weak_model=: a weaker version of the model (smaller, or trained "
                             "for less long) that takes the same inputs, e.g. an earlier EMA snapshot")
        if isinstance(self.weak_model, (str, os.PathLike)):
            from ..load import load_model
            self._module = load_model(self.weak_model)
        elif isinstance(self.weak_model, torch.nn.Module):
            self._module = self.weak_model
        else:
            raise ValueError(f"AutoGuidance weak_model must be a torch.nn.Module called like the main model (or a "
                             f"model name or folder), got {type(self.weak_model).__name__}")

    @property
    def module(self) -> torch.nn.Module:
        """The weak model itself (loaded, where ``weak_model`` names it)."""
        return self._module

    def bind(self, key, context):
        weak = self.module
        if weak is context.model:  # the same network on the same inputs: ε_weak = ε_c, no pass needed
            return BoundAutoGuidance(self, key, None)
        backend = detect(weak)
        check_compatible(context.model, context.backend, weak, backend)
        return BoundAutoGuidance(self, key, backend)


def _eps_channels(model, backend) -> int | None:
    config = getattr(model, "config", {})
    return config.get("in_channels") if backend.learned_sigma(model) else config.get("out_channels")


def check_compatible(model, backend, weak, weak_backend) -> None:
    """One ValueError naming the first difference that keeps ``weak`` from guiding ``model``."""
    main_name, weak_name = type(model).__name__, type(weak).__name__
    if weak_backend.name != backend.name:
        raise ValueError(f"AutoGuidance: weak_model is a {weak_name} ({weak_backend.name} family), the model a "
                         f"{main_name} ({backend.name} family); the weak model must be of the same family")
    config, weak_config = getattr(model, "config", {}), getattr(weak, "config", {})
    differences = [(k, config.get(k), weak_config.get(k)) for k in INTERFACE_KEYS
                   if (k in config or k in weak_config) and config.get(k) != weak_config.get(k)]
    main_eps, weak_eps = _eps_channels(model, backend), _eps_channels(weak, weak_backend)
    if main_eps != weak_eps:
        differences.append(("output channels (ε part)", main_eps, weak_eps))
    if differences:
        key, a, b = differences[0]
        raise ValueError(f"AutoGuidance: weak_model ({weak_name}) does not take the inputs or give the outputs of "
                         f"the model ({main_name}): {key} is {b!r} on the weak model, {a!r} on the model"
                         + (f" (and {len(differences) - 1} more: {', '.join(d[0] for d in differences[1:])})"
                            if len(differences) > 1 else ""))
    p, q = next(model.parameters(), None), next(weak.parameters(), None)
    if p is not None and q is not None and (p.device, p.dtype) != (q.device, q.dtype):
        raise ValueError(f"AutoGuidance: weak_model is on {q.device} in {q.dtype}, the model on {p.device} in "
                         f"{p.dtype}; move it with weak_model.to(device, dtype)")


class BoundAutoGuidance(Bound):
    order = 1  # the weak model's pass runs after the batched forward

    def __init__(self, term: AutoGuidance, key: str, backend):
        super().__init__(term, key)
        self.backend = backend  # None: the weak model is the main model itself

    def weak_prediction(self, step) -> torch.Tensor:
        """ε_weak(x_t, c): the weak model on the conditional branch's inputs, in eval mode."""
        x, inputs = step.x, step.inputs["cond"]
        if self.backend is None:  # weak_model is the model: ε_weak is ε_c (also inside ``attach``, no recursion)
            return step.eps["cond"]
        weak = self.term.module
        training = [m for m in weak.modules() if m.training]
        for m in training:
            m.training = False
        try:
            out = self.backend.call(weak, x, step.t, inputs)
        finally:
            for m in training:
                m.training = True
        return out[:, :x.shape[1]]

    def contribution(self, scale, step):
        """(w − 1)(ε_c − ε_weak,c), added to ε_c (or to CFG's ε_u + w_cfg(ε_c − ε_u))."""
        return self.scaled_difference(scale - 1.0, step.eps["cond"], self.weak_prediction(step), step)
