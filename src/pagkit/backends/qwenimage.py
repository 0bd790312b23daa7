"""Qwen-Image: ``QwenImageTransformer2DModel``: double-stream blocks only.

Each ``transformer_blocks.N.attn`` is a **joint** site over **[text; image]** (text first):
separate projections per stream, per-head QK-norm, then RoPE applied to each stream with its
own table (``QwenEmbedRope``) before the two are concatenated inside the processor. The text
mask (``encoder_hidden_states_mask``) becomes a boolean key mask over the joint sequence; the
perturbation keeps it. Latents are packed 2×2 patches, so the image grid comes from
``img_shapes`` ([(frames, h, w), …] per sample, in tokens). With more than one image per sample
(Qwen-Image-Edit's reference images) the image stream holds all of them: the token count is
kept, with no grid for SEG. The rotary tables are shared by every sample.

``zero_cond_t`` (Qwen-Image-Edit-2511): the model modulates the reference images' tokens at t = 0, building a
per-sample token index from ``img_shapes`` and a time embedding of [t rows; 0 rows]. ``img_shapes`` is then
given one entry per row of the batched call (every sample of a pipeline call has the same shapes), and prefix
sharing is off: slicing rows of that doubled embedding would mix its halves, so the plain batched pass runs.
"""
from __future__ import annotations

from . import Backend, ForwardInfo, Site, register


@register
class QwenImageBackend(Backend):
    name = "qwenimage"
    model_classes = ("QwenImageTransformer2DModel",)
    shared_inputs = frozenset({"image_rotary_emb", "img_shapes"})
    timestep_divisor = 1000.0  # QwenImagePipeline calls the transformer with t / 1000
    tested_against = "a reference joint forward with an explicit mask (text mask kept)"

    def sites(self, model):
        return [Site(f"transformer_blocks.{i}.attn", "joint", b.attn.heads, b.attn.to_q.in_features, 1,
                     image_first=False) for i, b in enumerate(model.transformer_blocks)]

    def stages(self, model):
        if getattr(model.config, "zero_cond_t", False):
            return []  # exact without sharing (see the module's docstring)
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def call(self, forward, x, t, kwargs):
        shapes = kwargs.get("img_shapes")
        if isinstance(shapes, list) and shapes and len(shapes) != x.shape[0]:  # one entry per row (zero_cond_t)
            kwargs = {**kwargs, "img_shapes": [shapes[0]] * x.shape[0]}
        return super().call(forward, x, t, kwargs)

    def forward_info(self, model, x, kwargs):
        shapes = kwargs.get("img_shapes")
        if not shapes:
            return ForwardInfo()
        shapes = shapes[0]
        if isinstance(shapes, tuple) and len(shapes) == 3 and all(isinstance(s, int) for s in shapes):
            shapes = [shapes]
        shapes = list(shapes)
        if len(shapes) == 1 and shapes[0][0] == 1 and shapes[0][1] * shapes[0][2] == x.shape[1]:
            return ForwardInfo(hw=(int(shapes[0][1]), int(shapes[0][2])))
        return ForwardInfo(hw=(1, x.shape[1]))  # several images (or frames): the count, no grid for SEG

    def learned_sigma(self, model):
        return False

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError("Qwen-Image takes packed latents with img_shapes: sample through diffusers' "
                         "QwenImagePipeline with pagkit.attach(pipe, ...)")
