"""Z-Image: ``ZImageTransformer2DModel``.

Three kinds of attention, each a diffusers ``Attention`` with ``ZSingleStreamAttnProcessor`` (RMS
QK-norm, then complex RoPE, then ``dispatch_attention_fn``):

* ``noise_refiner.N.attention``: image tokens only, a **self** site. The model pads each image's
  F·(H/p)·(W/p) tokens to a multiple of 32 with a learned pad token; the image is [0, n) of that
  sequence and the pad tokens are not image tokens (no grid position, SEG does not blur them).
* ``context_refiner.N``: caption tokens only. **Not a site.**
* ``layers.N.attention``: **single**-stream sites over **[image; image pad; caption; caption pad]**
  per sample (image first), the image part padded to a multiple of 32 and the caption to a
  multiple of 32, rows of a batch then padded to the longest (masked). The image tokens are
  [0, n) in every row whatever the captions' lengths, so a batch whose captions differ in length
  (CFG's negative prompt) has one layout.

Call convention: the model takes ``x`` as a list of (C, F, H, W) latents and ``cap_feats`` as a
list of (S_i, D) caption features of varying lengths, the timestep as ``t`` (1 − σ: 0 = noise),
and returns a list. pagkit holds one batch tensor per input: ``input_batch`` stacks x to
(B, C, F, H, W); ``per_sample_inputs`` pads the captions to (B, S, D), S a multiple of 512 (the
pipelines' ``max_sequence_length``, so CFG's halves and a separate negative prompt concatenate),
with their lengths under ``cap_lengths``; ``call`` unbinds both back into lists and stacks the
model's output, and ``caller_output`` gives a caller the model's list. The omni mode (nested lists,
SigLIP features) is not supported. Nothing is shared between samples.
"""
from __future__ import annotations

import math

import torch

from . import Backend, ForwardInfo, Site, register

_CAP = "cap_feats"
_LENGTHS = "cap_lengths"  # pagkit's own input: the valid rows of each padded caption
_BUCKET = 512


@register
class ZImageBackend(Backend):
    name = "zimage"
    model_classes = ("ZImageTransformer2DModel",)
    input_name = "x"
    timestep_name = "t"
    tested_against = "a reference self/single-stream forward with an explicit mask; ZImagePipeline by hand"

    def sites(self, model):
        def site(name, attn, kind):
            return Site(name, kind, attn.heads, attn.to_q.in_features, 1, image_first=True)
        return ([site(f"noise_refiner.{i}.attention", b.attention, "self") for i, b in enumerate(model.noise_refiner)]
                + [site(f"layers.{i}.attention", b.attention, "single") for i, b in enumerate(model.layers)])

    def stages(self, model):
        # the x/caption embedders take every sample's tokens concatenated on one axis: not stages
        return ([f"noise_refiner.{i}" for i in range(len(model.noise_refiner))]
                + [f"context_refiner.{i}" for i in range(len(model.context_refiner))]
                + [f"layers.{i}" for i in range(len(model.layers))])

    def forward_info(self, model, x, kwargs):
        """The token grid: (H/p, W/p), with F/pf frames when there is more than one."""
        p, pf = int(kwargs.get("patch_size", 2)), int(kwargs.get("f_patch_size", 1))
        frames = x.shape[-3] // pf
        return ForwardInfo(hw=(x.shape[-2] // p, x.shape[-1] // p), frames=frames if frames > 1 else None)

    def sample_info(self, model):
        return None

    def layout(self, site, seq_len, info):
        # every sequence, the refiners' too, is padded: the image tokens are [0, n), never the whole sequence
        return self.image_span(site, seq_len, self.grid(site, info), image_first=True)

    def input_batch(self, model, x):
        if torch.is_tensor(x):
            return x
        if any(not torch.is_tensor(xi) for xi in x):
            raise ValueError("pagkit does not support Z-Image's omni mode (x as nested lists)")
        if len({tuple(xi.shape) for xi in x}) > 1:
            raise ValueError(f"pagkit guides Z-Image batches of one latent size; got {sorted({tuple(xi.shape) for xi in x})}")
        return torch.stack(list(x))

    def per_sample_inputs(self, model, x, kwargs):
        caps = kwargs.get(_CAP)
        if caps is None or torch.is_tensor(caps):
            return kwargs
        lengths = [c.shape[0] for c in caps]
        size = _BUCKET * max(1, math.ceil(max(lengths) / _BUCKET))
        padded = caps[0].new_zeros(len(caps), size, caps[0].shape[-1])
        for i, c in enumerate(caps):
            padded[i, :c.shape[0]] = c
        return {**kwargs, _CAP: padded, _LENGTHS: torch.tensor(lengths, device=padded.device)}

    def call(self, forward, x, t, kwargs):
        kwargs = dict(kwargs)
        caps, lengths = kwargs.pop(_CAP), kwargs.pop(_LENGTHS, None)
        if torch.is_tensor(caps):
            caps = list(caps.unbind(0)) if lengths is None else [c[:int(n)] for c, n in zip(caps, lengths)]
        out = forward(list(x.unbind(0)), t, caps, **kwargs, return_dict=False)[0]
        return torch.stack(list(out))

    def caller_output(self, model, out):
        return list(out.unbind(0))

    def learned_sigma(self, model):
        return False

    def sample_shape(self, model, batch_size, height, width):
        if height is None or width is None:
            raise ValueError("Z-Image's config has no sample size; pass height= and width= (latent cells)")
        return (batch_size, model.config.in_channels, 1, height, width)

    def scheduler_timestep(self, t):
        """ZImagePipeline calls the model with t = (1000 − T) / 1000 of the scheduler's T."""
        return 1000.0 * (1.0 - super().scheduler_timestep(t))
