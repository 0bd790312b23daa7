"""PAG and SEG through ``pagkit.attach`` on Flux2KleinKVPipeline (Flux.2-klein with KV-cached reference images).

The reference is written here: the pipeline itself, its transformer's forward replaced by ε + s(ε − ε̂), with ε̂
from a separate, unbatched call in which the chosen sites' KV attention is an explicit masked softmax (the
identity: an image query sees the text keys and its own key, no reference or other image key; SoftPAG: that
mixed with the plain map on one head; SEG σ = ∞: the image queries replaced by their mean, over every key). Step 0 of the pipeline extracts the reference K/V cache,
steps 1–2 use it, so both modes are covered; the cache the pipeline keeps is the plain call's.
"""
from __future__ import annotations

import math
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.models.transformers import transformer_flux2 as F2

import models
import pagkit

SITES = ["transformer_blocks.1.attn", "single_transformer_blocks.0.attn"]  # one joint, one single-stream site
STEPS = 3


def _images():
    rng = np.random.RandomState(0)
    return [PIL.Image.fromarray((rng.rand(*shape, 3) * 255).astype("uint8")) for shape in ((64, 64), (64, 96))]


def _run(pipe, **kwargs):
    emb = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(3))
    return pipe(image=_images(), prompt_embeds=emb, height=64, width=64, num_inference_steps=STEPS,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images


def _reference_attention(kind):
    """``_flux2_kv_causal_attention`` as an explicit masked softmax, with the perturbation ``kind`` on the image
    queries; (B, S, heads, d) tensors as diffusers' processors hold them."""
    def attention(query, key, value, num_txt_tokens, num_ref_tokens, kv_cache=None, backend=None):
        t = num_txt_tokens
        if kv_cache is not None:  # cached: queries [text; image], keys [text; reference; image]
            k_ref, v_ref = kv_cache.get()
            r = k_ref.shape[1]
            key = torch.cat([key[:, :t], k_ref, key[:, t:]], dim=1)
            value = torch.cat([value[:, :t], v_ref, value[:, t:]], dim=1)
            own = torch.cat([torch.arange(t), torch.arange(t + r, key.shape[1])])  # each query's own key
        else:  # extract: queries and keys [text; reference; image]
            r = num_ref_tokens
            own = torch.arange(key.shape[1])
        n_keys = key.shape[1]
        allowed = torch.zeros(len(own), n_keys, dtype=torch.bool)
        image = own >= t + r
        allowed[own < t] = True  # text queries: every key
        allowed[(own >= t) & (own < t + r), t:t + r] = True  # reference queries: the reference keys (the model's)
        q = query.clone()
        plain = allowed.clone()
        plain[image] = True
        if kind == "mean":  # SEG σ = ∞: every image query is their mean, over every key
            allowed = plain
            q[:, image] = query[:, image].mean(dim=1, keepdim=True)
        else:  # the identity
            allowed[image, :t] = True
            allowed[image.nonzero()[:, 0], own[image]] = True

        def attend(q, allowed):
            logits = torch.einsum("bqhd,bkhd->bhqk", q, key) / math.sqrt(q.shape[-1])
            weights = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            return torch.einsum("bhqk,bkhd->bqhd", weights, value)
        if kind == "soft":  # SoftPAG α = 0.5 on head 1: A' = (1 − α)A + αI there, A on head 0
            out = attend(q, plain)
            out[:, :, 1] = 0.5 * out[:, :, 1] + 0.5 * attend(q, allowed)[:, :, 1]
            return out
        return attend(q, allowed)
    return attention


def _perturbed_processors(kind):
    attention = _reference_attention(kind)

    class Joint(F2.Flux2KVAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, kv_cache=None, kv_cache_mode=None, num_ref_tokens=0):
            with mock.patch.object(F2, "_flux2_kv_causal_attention", attention):
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                        kv_cache, kv_cache_mode, num_ref_tokens)

    class Single(F2.Flux2KVParallelSelfAttnProcessor):
        def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, kv_cache=None,
                     kv_cache_mode=None, num_txt_tokens=0, num_ref_tokens=0):
            with mock.patch.object(F2, "_flux2_kv_causal_attention", attention):
                return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb, kv_cache,
                                        kv_cache_mode, num_txt_tokens, num_ref_tokens)
    return {"joint": Joint, "single": Single}


def _reference(pipe, scale, kind, **kwargs):
    """The pipeline with its transformer returning ε + s(ε − ε̂) (and the plain call's KV cache at step 0)."""
    model = pipe.transformer
    plain_forward = model.forward
    classes = _perturbed_processors(kind)

    def guided(*args, **kwargs):
        eps = plain_forward(*args, **kwargs)
        modules = [model.get_submodule(name) for name in SITES]
        saved = [m.processor for m in modules]
        for name, m in zip(SITES, modules):
            m.processor = classes["single" if name.startswith("single") else "joint"]()
        try:
            eps_hat = plain_forward(*args, **kwargs)
        finally:
            for m, p in zip(modules, saved):
                m.processor = p
        return (eps[0] + scale * (eps[0] - eps_hat[0]), *eps[1:])  # eps[1]: the plain call's cache (extract)

    model.forward = guided
    try:
        return _run(pipe, **kwargs)
    finally:
        del model.forward


def _processors(model):
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def _restored(model, processors):
    return _processors(model) == processors and all(
        a is b for a, b in zip(_processors(model).values(), processors.values())) and \
        not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("term, kind, per_prompt", [
    (pagkit.PAG(2.0, layers=SITES), "identity", 1),
    (pagkit.PAG(2.0, layers=SITES), "identity", 2),  # a cache of 2 rows, for a guided batch of 4
    (pagkit.PAG(2.0, layers=SITES, strength=0.5, heads=[1]), "soft", 1),
    (pagkit.SEG(2.0, sigma=float("inf"), layers=SITES), "mean", 1)],
    ids=["PAG", "PAG-2-images", "SoftPAG-head", "SEG-inf"])
def test_attach_on_the_kv_pipeline_equals_the_reference(term, kind, per_prompt):
    pipe = models.flux2_klein_kv_pipeline()
    processors = _processors(pipe.transformer)
    with pagkit.attach(pipe, [term]):
        out = _run(pipe, num_images_per_prompt=per_prompt)
    assert _restored(pipe.transformer, processors)
    expected = _reference(pipe, term.scale, kind, num_images_per_prompt=per_prompt)
    plain = _run(pipe, num_images_per_prompt=per_prompt)
    assert out.shape[0] == per_prompt
    assert (expected - plain).abs().max() > 1e-3  # the perturbation does something
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_pag_scale_zero_is_the_plain_pipeline_and_the_model_is_restored_after_an_error():
    pipe = models.flux2_klein_kv_pipeline()
    processors = _processors(pipe.transformer)
    plain = _run(pipe)
    with pagkit.attach(pipe, [pagkit.PAG(0.0, layers=SITES)]):
        assert torch.equal(_run(pipe), plain)
    assert _restored(pipe.transformer, processors)

    def fail(pipe, i, t, tensors):
        if i == 1:  # after the extract step and one cached step
            raise RuntimeError("stop")
        return tensors
    with pytest.raises(RuntimeError, match="stop"), pagkit.attach(pipe, [pagkit.PAG(2.0, layers=SITES)]):
        _run(pipe, callback_on_step_end=fail)
    assert _restored(pipe.transformer, processors)
    assert torch.equal(_run(pipe), plain)


def _extract_inputs(refs=16):
    x, t, cond = models.flux2_inputs(batch=1)
    ref_ids = torch.zeros(4, 4, 4)
    ref_ids[..., 0] = 10
    ref_ids[..., 1] = torch.arange(4)[:, None]
    ref_ids[..., 2] = torch.arange(4)[None, :]
    hidden = torch.cat([torch.randn(1, refs, 8, generator=torch.Generator().manual_seed(5)), x], dim=1)
    return x, dict(hidden_states=hidden, timestep=t[:1], encoder_hidden_states=cond["encoder_hidden_states"],
                   img_ids=torch.cat([ref_ids.reshape(-1, 4), cond["img_ids"]])[None], txt_ids=cond["txt_ids"][None],
                   kv_cache_mode="extract", num_ref_tokens=refs)


def test_the_extracted_cache_is_the_unperturbed_rows_and_feeds_the_cached_mode():
    pipe = models.flux2_klein_kv_pipeline()
    model = pipe.transformer
    x, inputs = _extract_inputs()
    with torch.no_grad():
        plain_out, plain_cache = model(**inputs, return_dict=False)
        with pagkit.attach(pipe, [pagkit.PAG(2.0, layers=SITES)]):
            out, cache = model(**inputs, return_dict=False)
            as_dict = model(**inputs)
            cached = {**inputs, "hidden_states": x, "img_ids": inputs["img_ids"][:, 16:], "kv_cache": cache,
                      "kv_cache_mode": "cached"}
            (next_out,) = model(**cached, return_dict=False)
        plain_next = model(**{**cached, "kv_cache": plain_cache}, return_dict=False)[0]
    assert out.shape == plain_out.shape and next_out.shape == plain_next.shape == (1, 24, 8)
    assert as_dict.kv_cache is not None and torch.equal(as_dict.sample, out)
    for mine, theirs in zip(cache.double_block_caches + cache.single_block_caches,
                            plain_cache.double_block_caches + plain_cache.single_block_caches):
        assert mine.k_ref.shape == theirs.k_ref.shape == (1, 16, 2, 8)
        torch.testing.assert_close(mine.k_ref, theirs.k_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.v_ref, theirs.v_ref, rtol=0, atol=1e-6)
    assert cache.num_ref_tokens == 16
    assert (out - plain_out).abs().max() > 1e-4 and (next_out - plain_next).abs().max() > 1e-4


@pytest.mark.parametrize("term, match", [
    (pagkit.SLG(2.0, layers="transformer_blocks.1", start=0.0, stop=1.0), "PAG and SEG only.*SLG"),
    (pagkit.PAG(2.0, layers=SITES, perturbation="noise"), "identity.*query blur.*LogitNoise"),
])
def test_other_terms_are_refused_in_the_kv_mode(term, match):
    """Refused at the first step they act in (SLG: step 1, cached; the noise ablation: step 0, extract), before
    that step's forward, and the model is restored."""
    pipe = models.flux2_klein_kv_pipeline()
    processors = _processors(pipe.transformer)
    with pytest.raises(ValueError, match=f"KV-cache mode.*{match}"), pagkit.attach(pipe, [term]):
        _run(pipe)
    assert _restored(pipe.transformer, processors)
