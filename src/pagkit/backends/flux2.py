"""Flux.2: ``Flux2Transformer2DModel``: Flux.1's layout, with the single-stream attention fused with the MLP.

Double-stream ``transformer_blocks.N.attn`` (``Flux2Attention``) are **joint** sites and
``single_transformer_blocks.N.attn`` (``Flux2ParallelSelfAttention``: one projection gives q, k,
v and the MLP input) are **single**-stream sites, both over **[text; image]**. Per-head QK-norm,
then RoPE over the joint sequence (text and image tables concatenated), all inside the model's
processors. The image grid comes from ``img_ids`` (columns h, w of its (t, h, w, l) ids); with
reference images in the image stream (Flux2KleinPipeline) the ids are not one full grid, so the count is kept
with no grid for SEG, and the reference tokens are image tokens like the others.

**KV-cache mode** (``kv_cache_mode``: Flux2KleinKVPipeline with reference images). Reference tokens attend only
among themselves, modulated by a fixed timestep, and their post-RoPE K/V are cached: at step 0 ("extract") the
image stream is [reference R; image N], the model returns (prediction, cache), and each site makes two attention
calls, the text and image queries over the keys [text T; reference R; image N], then the reference queries over
the reference keys; at later steps ("cached") the reference tokens are gone and the cached K/V are put between
the text and image keys of the one call. What a perturbation does there:

* It acts on the **image queries** of the first call only. Text queries are untouched, as on every joint site;
  the reference queries (the second call) are never perturbed, so every row's reference stream, and with it the
  cache, is the same function of the reference latents alone: the cache handed back at step 0 is that of the
  first branch's rows (the pipeline's own, unperturbed), and at later steps every branch's rows get the
  pipeline's cache.
* **PAG** (``Identity``): the reference keys count as image tokens of the image→image block (as they do in
  Flux2KleinPipeline's sequence): an image query attends, among the image and reference keys, only to its own
  key, and still to the text keys; ``strict=True``: its output is its own V. SoftPAG mixes that with the
  model's own attention (reference keys included) as everywhere.
* **SEG** (``QueryBlur``): the image queries are blurred over the image grid (the N generated tokens; the
  reference tokens are not on it) and attend to every key, the reference ones included.

Other patches (SLG, TPG, NAG, SAG, the mask/noise ablations, autoguidance's weak model) are refused in that
mode: they would change the reference stream or need keys and queries of one sequence. Prefix sharing is off
there (the cache holds rows the shared stages do not see as a tensor).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ForwardInfo, Site, register
from .flux import FluxBackend
from ..perturb import Identity, QueryBlur, SoftIdentity, sdpa

_KV_PERTURBATIONS = (Identity, SoftIdentity, QueryBlur)
_KV_TERMS = ("PAG", "SEG")


@dataclass
class KVForwardInfo(ForwardInfo):
    """A forward in Flux.2-klein's KV-cache mode: ``mode`` "extract" or "cached", ``reference_tokens`` R."""

    mode: str = "cached"
    reference_tokens: int = 0


class _ExtractedCache:
    """Where the KV cache of an extract-mode call goes: its first ``rows`` rows (the caller's batch), for
    ``model_output`` to hand back to the caller beside the prediction."""

    def __init__(self, rows: int):
        self.rows, self.cache = rows, None


def _kv_mode(kwargs: dict) -> str | None:
    """"extract" or "cached" when the call runs the KV-cache mode with reference tokens, else None."""
    mode = kwargs.get("kv_cache_mode")
    if mode == "extract" and kwargs.get("num_ref_tokens", 0) > 0:
        return mode
    if mode == "cached" and kwargs.get("kv_cache") is not None:
        return mode
    return None


def _layers(cache) -> list:
    """The layer caches of a ``Flux2KVCache``, double-stream blocks first."""
    return list(cache.double_block_caches) + list(cache.single_block_caches)


@register
class Flux2Backend(FluxBackend):
    name = "flux2"
    model_classes = ("Flux2Transformer2DModel",)
    tested_against = ("a reference joint/single-stream forward with an explicit mask; Flux2KleinKVPipeline "
                      "through attach, against a reference processor")

    def sites(self, model):
        def site(name, attn, kind):
            return Site(name, kind, attn.heads, attn.query_dim, 1, image_first=False)
        return ([site(f"transformer_blocks.{i}.attn", b.attn, "joint") for i, b in enumerate(model.transformer_blocks)]
                + [site(f"single_transformer_blocks.{i}.attn", b.attn, "single")
                   for i, b in enumerate(model.single_transformer_blocks)])

    # --- KV-cache mode (see the module docstring) -----------------------------------------------------------

    def per_sample_inputs(self, model, x, kwargs):
        """The cached mode's ``Flux2KVCache`` as per-layer (K, V) tensors, so branches repeat its rows like any
        per-sample input; the extract mode gets a place for the cache the model returns."""
        mode = _kv_mode(kwargs)
        if mode == "extract":
            return {**kwargs, "kv_cache": _ExtractedCache(x.shape[0])}
        if mode != "cached" or isinstance(kwargs["kv_cache"], dict):
            return kwargs
        cache = kwargs["kv_cache"]
        layers = [layer.get() for layer in _layers(cache)]
        bad = [tuple(t.shape) for kv in layers for t in kv if t.shape[0] != x.shape[0]]
        if bad:
            raise ValueError(f"Flux.2 KV cache: its reference K/V have shape {bad[0]}, not one row per sample of the "
                             f"call's {x.shape[0]} (pass the cache the pipeline's own step 0 returned)")
        return {**kwargs, "kv_cache": {"layers": layers, "double": len(cache.double_block_caches),
                                       "num_ref_tokens": cache.num_ref_tokens}}

    def forward_info(self, model, x, kwargs):
        mode = _kv_mode(kwargs)
        if mode is None:
            return super().forward_info(model, x, kwargs)
        if mode == "extract":  # the image stream is [reference; image]: the grid is the image tokens' ids
            refs = int(kwargs["num_ref_tokens"])
            ids = kwargs["img_ids"]
            ids = ids[:, refs:] if ids.ndim == 3 else ids[refs:]
            info = super().forward_info(model, x[:, refs:], {**kwargs, "img_ids": ids})
        else:
            cache = kwargs["kv_cache"]
            refs = int(cache["num_ref_tokens"] if isinstance(cache, dict) else cache.num_ref_tokens)
            info = super().forward_info(model, x, kwargs)
        return KVForwardInfo(hw=info.hw, text_tokens=kwargs["encoder_hidden_states"].shape[1], mode=mode,
                             reference_tokens=refs)

    def check_step(self, model, inputs, terms, patches, captures):
        mode = _kv_mode(inputs)
        if mode is None:
            return
        where = f"Flux.2-klein's KV-cache mode (kv_cache_mode={mode!r}, Flux2KleinKVPipeline with reference images)"
        others = sorted({type(t).__name__ for t in terms if type(t).__name__ not in _KV_TERMS})
        if others or captures:
            raise ValueError(f"{where} takes PAG and SEG only (they perturb the image queries and leave the cached "
                             f"reference stream as it is); got {', '.join(others or ['SAG'])}")
        bad = sorted({type(p).__name__ for p in patches.values() if not isinstance(p, _KV_PERTURBATIONS)})
        if bad:
            raise ValueError(f"{where} takes the identity (PAG, SoftPAG) and query blur (SEG) perturbations; got "
                             f"{', '.join(bad)}")

    def shares_prefix(self, inputs):
        return _kv_mode(inputs) is None

    def perturbs_call(self, site, call, info):
        # extract mode: the second call is the reference queries attending among themselves
        return not (isinstance(info, KVForwardInfo) and info.mode == "extract" and call > 0)

    def attend(self, site, perturbation, q, k, v, layout, attn_mask, scale):
        refs = k.shape[-2] - q.shape[-2]
        if refs == 0:
            return super().attend(site, perturbation, q, k, v, layout, attn_mask, scale)
        # queries [text T; image N], keys [text T; reference R; image N]
        t, end = layout.image
        if attn_mask is not None or end != q.shape[-2] or refs < 0:
            raise ValueError(f"site {site.name}: pagkit expects Flux.2-klein's KV attention as image queries last "
                             f"and {q.shape[-2]} queries over {q.shape[-2]} + R keys, unmasked; got "
                             f"{q.shape[-2]} queries, {k.shape[-2]} keys, image tokens {layout.image}")
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        out[:, :, :t] = sdpa(q[:, :, :t], k, v, None, scale)  # text queries: the model's own attention
        if isinstance(perturbation, QueryBlur):  # blurred image queries over every key
            out[:, :, t:] = perturbation.attend_joint_image(q, k, v, layout, None, scale)
            return out
        # the identity: among image and reference keys only the query's own; the keys of its own [text; image]
        own_k = torch.cat([k[:, :, :t], k[:, :, t + refs:]], dim=2)
        own_v = torch.cat([v[:, :, :t], v[:, :, t + refs:]], dim=2)
        strict = perturbation.strict
        identity = Identity(strict=strict).attend_joint_image(q, own_k, own_v, layout, None, scale)
        if isinstance(perturbation, SoftIdentity):
            identity = perturbation.mix(sdpa(q[:, :, t:], k, v, None, scale), identity)
        out[:, :, t:] = identity
        return out

    def call(self, forward, x, t, kwargs):
        mode = _kv_mode(kwargs)
        if mode is None:
            return super().call(forward, x, t, kwargs)
        if mode == "cached":
            kwargs = {**kwargs, "kv_cache": self._cache(kwargs["kv_cache"], x.shape[0])}
            return forward(x, timestep=t, **kwargs, return_dict=False)[0]
        place = kwargs.get("kv_cache")
        kwargs = {k: v for k, v in kwargs.items() if k != "kv_cache"}  # the model makes its own at this step
        out, cache = forward(x, timestep=t, **kwargs, return_dict=False)
        if isinstance(place, _ExtractedCache):  # the caller's rows: the first branch's, unperturbed
            for layer in _layers(cache):
                k_ref, v_ref = layer.get()
                layer.store(k_ref[:place.rows], v_ref[:place.rows])
            place.cache = cache
        return out

    @staticmethod
    def _cache(value, rows: int):
        """A ``Flux2KVCache`` of ``rows`` rows from ``per_sample_inputs``' form (already batched by branch)."""
        from diffusers.models.transformers.transformer_flux2 import Flux2KVCache
        if not isinstance(value, dict):  # a cache given to predict directly, not through per_sample_inputs
            rows_of = {layer.get()[0].shape[0] for layer in _layers(value)}
            if rows_of != {rows}:
                raise ValueError(f"Flux.2 KV cache of {sorted(rows_of)} rows for a batch of {rows}: pass the "
                                 "model's inputs through Backend.per_sample_inputs (pagkit.attach does)")
            return value
        layers = value["layers"]
        cache = Flux2KVCache(value["double"], len(layers) - value["double"])
        for layer, (k_ref, v_ref) in zip(_layers(cache), layers):
            layer.store(k_ref, v_ref)
        cache.num_ref_tokens = value["num_ref_tokens"]
        return cache

    def model_output(self, model, out, inputs, return_dict):
        place = inputs.get("kv_cache")
        if not isinstance(place, _ExtractedCache):
            return super().model_output(model, out, inputs, return_dict)
        if not return_dict:
            return out, place.cache
        from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModelOutput
        return Flux2Transformer2DModelOutput(sample=out, kv_cache=place.cache)

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError("Flux.2 takes packed latents with txt_ids/img_ids: sample through diffusers' Flux2Pipeline "
                         "with pagkit.attach(pipe, ...)")
