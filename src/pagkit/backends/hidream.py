"""HiDream-I1: ``HiDreamImageTransformer2DModel``: double-stream blocks, then single-stream blocks.

Both attend over **[image; text]** (image first). ``double_stream_blocks.N.block.attn1`` are
**joint** sites (separate projections per stream, concatenated inside ``HiDreamAttnProcessor``);
``single_stream_blocks.N.block.attn1`` are **single**-stream sites (the model concatenates
[image; T5 + Llama text; this block's Llama layer] before the block). The processor applies RMS
QK-norm over the full inner dimension, then RoPE on the joint sequence, before pagkit sees q
and k. The MoE feed-forward is not touched.

Image tokens: a square latent is patchified to (H/p)·(W/p) tokens; a non-square one is padded to
``max_seq`` tokens (``hidden_states_masks`` zeroes the padding's keys): the image stream is then
those ``max_seq`` positions, with no grid for SEG (``forward_info`` reports (1, max_seq) tokens).

Call convention: the timestep is ``timesteps=``, and the Llama states come as one tensor
(layers, batch, tokens, dim), batch on axis 1 (``HiDreamImagePipeline`` concatenates CFG's
halves there). pagkit's inputs are per sample on axis 0, so ``per_sample_inputs`` moves the
batch axis first and ``call`` moves it back. Nothing is shared between samples.
"""
from __future__ import annotations

import torch

from . import Backend, ForwardInfo, Site, register

_LLAMA = "encoder_hidden_states_llama3"


@register
class HiDreamBackend(Backend):
    name = "hidream"
    model_classes = ("HiDreamImageTransformer2DModel",)
    timestep_name = "timesteps"
    tested_against = "a reference joint/single-stream forward with an explicit mask"

    def sites(self, model):
        def site(name, attn, kind):
            return Site(name, kind, attn.heads, attn.to_q.in_features, 1, image_first=True)
        return ([site(f"double_stream_blocks.{i}.block.attn1", b.block.attn1, "joint")
                 for i, b in enumerate(model.double_stream_blocks)]
                + [site(f"single_stream_blocks.{i}.block.attn1", b.block.attn1, "single")
                   for i, b in enumerate(model.single_stream_blocks)])

    def stages(self, model):
        return ([f"double_stream_blocks.{i}" for i in range(len(model.double_stream_blocks))]
                + [f"single_stream_blocks.{i}" for i in range(len(model.single_stream_blocks))])

    def forward_info(self, model, x, kwargs):
        p = int(model.config.patch_size)
        if x.ndim == 4:  # the model patchifies: square → the H/p × W/p grid; otherwise padded to max_seq
            h, w = x.shape[-2] // p, x.shape[-1] // p
            return ForwardInfo(hw=(h, w) if x.shape[-2] == x.shape[-1] else (1, model.max_seq))
        sizes = kwargs.get("img_sizes")  # packed (B, S, p·p·C) with img_sizes and hidden_states_masks
        sizes = {tuple(int(v) for v in s) for s in sizes} if sizes is not None else set()
        if len(sizes) == 1:
            h, w = sizes.pop()
            if h * w == x.shape[1]:
                return ForwardInfo(hw=(h, w))
        return ForwardInfo(hw=(1, x.shape[1]))

    def per_sample_inputs(self, model, x, kwargs):
        llama = kwargs.get(_LLAMA)
        if torch.is_tensor(llama):
            return {**kwargs, _LLAMA: llama.transpose(0, 1)}
        if isinstance(llama, (list, tuple)):  # one (batch, tokens, dim) tensor per Llama layer
            return {**kwargs, _LLAMA: torch.stack(list(llama), dim=1)}
        return kwargs

    def call(self, forward, x, t, kwargs):
        llama = kwargs.get(_LLAMA)
        if torch.is_tensor(llama):
            kwargs = {**kwargs, _LLAMA: llama.transpose(0, 1)}
        out = forward(x, timesteps=t, **kwargs, return_dict=False)
        return out if torch.is_tensor(out) else out[0]

    def learned_sigma(self, model):
        return False

    def sample_shape(self, model, batch_size, height, width):
        if height is None or width is None:
            raise ValueError("HiDream's config has no sample size; pass height= and width= (latent cells)")
        return (batch_size, model.config.in_channels, height, width)
