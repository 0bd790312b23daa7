"""``pagkit.attach`` on a plain diffusers pipeline against the PAG pipeline diffusers ships for it.

Same components, same seed, latents out; within 1e-4, with CFG and without where the pipeline allows it.
diffusers is given pagkit's layers as an explicit, anchored list, because its own layer matching is a
regex substring search (``"blocks.1"`` also selects blocks 10–19: tested below). Where diffusers'
reference is wrong (SD3.5's QK-norm, HunyuanDiT without CFG) the test says what it asserts instead.
"""
from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field

import diffusers
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import models
import pagkit

STEPS = 3


def _sd(controlnet=False):
    unet = models.sd_unet()
    out = dict(unet=unet, vae=models.vae(), scheduler=models.ddim(), text_encoder=None, tokenizer=None,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if controlnet:
        out["controlnet"] = models.controlnet(unet)
    return out


def _sdxl(controlnet=False):
    unet = models.sdxl_unet()
    out = dict(unet=unet, vae=models.vae(), scheduler=models.ddim(), text_encoder=None, text_encoder_2=None,
               tokenizer=None, tokenizer_2=None)
    if controlnet:
        out["controlnet"] = models.controlnet(unet)
    return out


def _kolors():
    # Kolors' ChatGLM only encodes the prompt; the UNet projects its 4096-d states (here 32-d) with text_proj
    return dict(unet=models.sdxl_unet(encoder_hid_dim=32, encoder_hid_dim_type="text_proj"), vae=models.vae(),
                scheduler=models.ddim(), text_encoder=None, tokenizer=None)


def _sd3(**transformer):
    return dict(transformer=models.sd3(**transformer), vae=models.vae(shift_factor=0.1),
                scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def _pixart():
    return dict(transformer=models.pixart(), vae=models.vae(), scheduler=models.ddim(), text_encoder=None,
                tokenizer=None)


def _hunyuandit():
    # vae=None: the pipeline's rotary grid assumes latents at 1/8 of the image (its vae_scale_factor without a VAE)
    return dict(transformer=models.hunyuandit(), vae=None, scheduler=models.ddim(), text_encoder=None,
                tokenizer=None, text_encoder_2=None, tokenizer_2=None, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def _sana(**transformer):
    return dict(transformer=models.sana(**transformer), vae=models.dc_vae(), scheduler=FlowMatchEulerDiscreteScheduler(),
                text_encoder=None, tokenizer=None)


def _embeds(family):
    """prompt_embeds & co. for ``family``, as its text encoders would give them (batch 1)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    if family == "sd":
        return dict(prompt_embeds=r(1, 7, 24), negative_prompt_embeds=r(1, 7, 24))
    if family in ("sdxl", "kolors"):
        d = 24 if family == "sdxl" else 32
        return dict(prompt_embeds=r(1, 7, d), negative_prompt_embeds=r(1, 7, d),
                    pooled_prompt_embeds=r(1, 24), negative_pooled_prompt_embeds=r(1, 24))
    if family == "sd3":
        return dict(prompt_embeds=r(1, 5, 24), negative_prompt_embeds=r(1, 5, 24),
                    pooled_prompt_embeds=r(1, 12), negative_pooled_prompt_embeds=r(1, 12))
    if family == "pixart":
        return dict(negative_prompt=None, prompt_embeds=r(1, 5, 24), negative_prompt_embeds=r(1, 5, 24),
                    prompt_attention_mask=torch.ones(1, 5), negative_prompt_attention_mask=torch.ones(1, 5),
                    use_resolution_binning=False)
    if family == "hunyuandit":
        return dict(prompt_embeds=r(1, 5, 24), negative_prompt_embeds=r(1, 5, 24), prompt_embeds_2=r(1, 6, 24),
                    negative_prompt_embeds_2=r(1, 6, 24), prompt_attention_mask=torch.ones(1, 5),
                    negative_prompt_attention_mask=torch.ones(1, 5), prompt_attention_mask_2=torch.ones(1, 6),
                    negative_prompt_attention_mask_2=torch.ones(1, 6), use_resolution_binning=False)
    if family == "sana":
        return dict(negative_prompt=None, prompt_embeds=r(1, 5, 8), negative_prompt_embeds=r(1, 5, 8),
                    prompt_attention_mask=torch.ones(1, 5), negative_prompt_attention_mask=torch.ones(1, 5),
                    use_resolution_binning=False)
    raise KeyError(family)


def _images(kind, size=32):
    """The image inputs of a pipeline kind: img2img/inpaint sources, masks, ControlNet conditions."""
    g = torch.Generator().manual_seed(2)
    image, control = torch.rand(1, 3, size, size, generator=g), torch.rand(1, 3, size, size, generator=g)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 2:] = 1.0
    return {"txt2img": dict(height=size, width=size),
            "img2img": dict(image=image, strength=0.75),
            "inpaint": dict(image=image, mask_image=mask, strength=0.75, height=size, width=size),
            "controlnet": dict(image=control, height=size, width=size),
            "controlnet_inpaint": dict(image=image, mask_image=mask, control_image=control, strength=0.75,
                                       height=size, width=size),
            "controlnet_img2img": dict(image=image, control_image=control, strength=0.75)}[kind]


@dataclass
class Case:
    reference: str  # diffusers' PAG pipeline
    plain: str  # the pipeline pagkit attaches to
    family: str
    kind: str = "txt2img"
    components: callable = None
    layers: str = "mid"  # pagkit's selection; diffusers gets the same sites, spelled out
    guidance_scales: tuple = (5.0, 1.0)
    size: int = 32
    extra: dict = field(default_factory=dict)


CASES = {
    "sd": Case("StableDiffusionPAGPipeline", "StableDiffusionPipeline", "sd", components=_sd),
    "sd_img2img": Case("StableDiffusionPAGImg2ImgPipeline", "StableDiffusionImg2ImgPipeline", "sd", "img2img", _sd),
    "sd_inpaint": Case("StableDiffusionPAGInpaintPipeline", "StableDiffusionInpaintPipeline", "sd", "inpaint", _sd),
    "sdxl": Case("StableDiffusionXLPAGPipeline", "StableDiffusionXLPipeline", "sdxl", components=_sdxl),
    "sdxl_img2img": Case("StableDiffusionXLPAGImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline", "sdxl",
                         "img2img", _sdxl),
    "sdxl_inpaint": Case("StableDiffusionXLPAGInpaintPipeline", "StableDiffusionXLInpaintPipeline", "sdxl",
                         "inpaint", _sdxl),
    "controlnet_sd": Case("StableDiffusionControlNetPAGPipeline", "StableDiffusionControlNetPipeline", "sd",
                          "controlnet", lambda: _sd(controlnet=True)),
    "controlnet_sd_inpaint": Case("StableDiffusionControlNetPAGInpaintPipeline",
                                  "StableDiffusionControlNetInpaintPipeline", "sd", "controlnet_inpaint",
                                  lambda: _sd(controlnet=True)),
    "controlnet_sdxl": Case("StableDiffusionXLControlNetPAGPipeline", "StableDiffusionXLControlNetPipeline", "sdxl",
                            "controlnet", lambda: _sdxl(controlnet=True)),
    "controlnet_sdxl_img2img": Case("StableDiffusionXLControlNetPAGImg2ImgPipeline",
                                    "StableDiffusionXLControlNetImg2ImgPipeline", "sdxl", "controlnet_img2img",
                                    lambda: _sdxl(controlnet=True)),
    "kolors": Case("KolorsPAGPipeline", "KolorsPipeline", "kolors", components=_kolors),
    "sd3": Case("StableDiffusion3PAGPipeline", "StableDiffusion3Pipeline", "sd3", components=_sd3, layers="blocks.1"),
    "sd3_img2img": Case("StableDiffusion3PAGImg2ImgPipeline", "StableDiffusion3Img2ImgPipeline", "sd3", "img2img",
                        _sd3, layers="blocks.1"),
    "pixart_sigma": Case("PixArtSigmaPAGPipeline", "PixArtSigmaPipeline", "pixart", components=_pixart,
                         layers="blocks.1", size=16),
    # diffusers' HunyuanDiTPAGPipeline crashes without CFG: see test_hunyuandit_without_cfg below
    "hunyuandit": Case("HunyuanDiTPAGPipeline", "HunyuanDiTPipeline", "hunyuandit", components=_hunyuandit,
                       layers="blocks.1", guidance_scales=(5.0,)),
    # Sana without QK-norm (with it diffusers skips norm_q/norm_k: test_sana15_qk_norm_… below)
    "sana": Case("SanaPAGPipeline", "SanaPipeline", "sana", components=_sana, layers="blocks.1"),
}


def diffusers_layers(model, selection) -> list[str]:
    """pagkit's sites for ``selection``, as anchored regexes diffusers' PAGMixin matches exactly."""
    return ["^" + re.escape(name) + "$" for name in pagkit.resolve_layers(model, selection)]


# diffusers exports the Kolors pipelines only with sentencepiece installed, which only their tokenizer needs
_MODULES = {"KolorsPAGPipeline": "diffusers.pipelines.pag.pipeline_pag_kolors",
            "KolorsPipeline": "diffusers.pipelines.kolors.pipeline_kolors"}


def _pipeline_class(name: str):
    return getattr(importlib.import_module(_MODULES[name]) if name in _MODULES else diffusers, name)


def _pipelines(case: Case):
    components = case.components()
    model = components.get("unet") or components["transformer"]
    reference = _pipeline_class(case.reference)(**components, pag_applied_layers=diffusers_layers(model, case.layers))
    pipe = _pipeline_class(case.plain)(**components)
    for p in (reference, pipe):
        p.set_progress_bar_config(disable=True)
    return reference, pipe


def _kwargs(case: Case, guidance_scale: float) -> dict:
    return dict(**_embeds(case.family), **_images(case.kind, case.size), **case.extra, guidance_scale=guidance_scale,
                num_inference_steps=STEPS + (1 if "strength" in _images(case.kind) else 0), output_type="latent")


def _run(pipe, kwargs, *guidance):
    if not guidance:
        return pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    with pagkit.attach(pipe, *guidance):
        return pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images


@pytest.mark.parametrize("name,guidance_scale",
                         [(n, w) for n, case in CASES.items() for w in case.guidance_scales])
def test_attach_matches_the_diffusers_pag_pipeline(name, guidance_scale):
    case = CASES[name]
    reference, pipe = _pipelines(case)
    kwargs = _kwargs(case, guidance_scale)
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers=case.layers))
    plain = _run(pipe, kwargs)
    # last: with output_type="latent" diffusers' SDXL inpaint PAG pipeline returns before restoring its processors
    expected = reference(**kwargs, pag_scale=2.0, generator=torch.Generator().manual_seed(1)).images
    assert type(pipe).__name__ == case.plain  # attach's call-recording subclass is gone after exit
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3  # PAG changed the result: the comparison is not vacuous


@pytest.mark.parametrize("build,short,site", [
    (lambda: models.sd3(num_layers=12), "blocks.1", "transformer_blocks.{}.attn"),
    (lambda: models.pixart(num_layers=12), "blocks.1", "transformer_blocks.{}.attn1"),
    (lambda: models.hunyuandit(num_layers=12), "blocks.1", "blocks.{}.attn1"),
])
def test_blocks_1_selects_block_1_only_where_diffusers_also_selects_blocks_10_to_19(build, short, site):
    """diffusers' default ``pag_applied_layers="blocks.1"`` (SD3, PixArt, HunyuanDiT) is ``re.search``: 1, 10, 11."""
    from diffusers.models.attention_processor import Attention
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    model = build()
    assert pagkit.resolve_layers(model, short) == [site.format(1)]

    class Holder(PAGMixin):  # PAGMixin's own layer matching, on this model
        transformer = model

    holder = Holder()
    holder.set_pag_applied_layers(short)
    originals = {n: m.processor for n, m in model.named_modules() if isinstance(m, Attention)}
    holder._set_pag_attn_processor(holder.pag_applied_layers, do_classifier_free_guidance=True)
    chosen = [n for n, m in model.named_modules() if isinstance(m, Attention) and m.processor is not originals[n]]
    assert chosen == [site.format(i) for i in (1, 10, 11)]


def test_hunyuandit_without_cfg():
    """diffusers' HunyuanDiTPAGPipeline crashes without CFG: it repeats the extra conditions (image_meta_size,
    style) for three branches while its batch holds two. pagkit runs, and its PAG changes the result."""
    case = CASES["hunyuandit"]
    reference, pipe = _pipelines(case)
    kwargs = _kwargs(case, 1.0)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        reference(**kwargs, pag_scale=2.0, generator=torch.Generator().manual_seed(1))
    reference, pipe = _pipelines(case)  # the crash left diffusers' PAG processors on the shared transformer
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers=case.layers))
    neutral = _run(pipe, kwargs, pagkit.PAG(0.0, layers=case.layers))
    plain = _run(pipe, kwargs)
    assert torch.isfinite(attached).all()
    assert torch.equal(neutral, plain)
    assert (attached - plain).abs().max() > 1e-3


def test_hunyuandit_routed_attention_receives_the_arguments_it_receives_without_pagkit(monkeypatch):
    """Every attention module gets the same arguments (image_rotary_emb included) with a PAG term active as
    without pagkit. pagkit's old routing processor took ``**kwargs``, so diffusers dropped image_rotary_emb on
    every routed layer (max |diff| 1.8 against HunyuanDiTPAGPipeline)."""
    from diffusers.models.attention_processor import Attention

    case = CASES["hunyuandit"]
    _, pipe = _pipelines(case)
    names = {m: n for n, m in pipe.transformer.named_modules() if isinstance(m, Attention)}
    calls: dict[str, list] = {}
    for cls in {type(m.processor) for m in names}:
        original = cls.__call__

        def recording(self, attn, *args, __original=original, **kwargs):
            calls.setdefault(names[attn], []).append(
                (len(args), sorted(k for k, v in kwargs.items() if v is not None), kwargs.get("image_rotary_emb")))
            return __original(self, attn, *args, **kwargs)
        recording.__wrapped__ = original  # diffusers passes a processor only the arguments its signature names
        monkeypatch.setattr(cls, "__call__", recording)
    kwargs = dict(_kwargs(case, 5.0), num_inference_steps=1)
    _run(pipe, kwargs)
    without, calls = calls, {}
    _run(pipe, kwargs, pagkit.PAG(2.0, layers=["blocks.1", "blocks.2"]))
    assert set(calls) == set(without) and len(without) == len(names)
    for name, recorded in without.items():
        assert [c[:2] for c in calls[name]] == [c[:2] for c in recorded], name
        for (_, _, ours), (_, _, theirs) in zip(calls[name], recorded):
            assert (ours is None) == (theirs is None), name
            if theirs is not None:
                assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), name
    assert any(c[2] is not None for c in without["blocks.1.attn1"])  # the rotary table is among the arguments


def _recording_forward(model):
    """Install on ``model`` a forward that records (arguments, output) of every call; attach wraps it in turn."""
    forward = type(model).forward.__get__(model)
    calls = []

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append((dict(inspect.signature(forward).bind(*args, **kwargs).arguments), out[0]))
        return out
    recording.__wrapped__ = forward  # the model's own signature, which attach binds
    model.forward = recording
    return calls


def test_sd35_qk_norm_diffusers_pag_pipeline_skips_it_and_pagkit_does_not():
    """No parity on SD3.5: diffusers' PAGCFGJointAttnProcessor2_0 never applies norm_q/norm_k/norm_added_q/
    norm_added_k, so even the unperturbed rows [∅; c] of StableDiffusion3PAGPipeline's batch are not the model's
    prediction: max |diff| 0.030 against the plain transformer over 3 steps of this tiny RMS-QK-norm model, and its
    latents end 0.15 away from pagkit's. pagkit's unperturbed rows are the plain transformer's exactly, and its
    neutral scale is the plain pipeline bit for bit. With dual attention (attn2 in blocks.1) diffusers' pipeline
    crashes."""
    case = CASES["sd3"]
    components = _sd3(qk_norm="rms_norm")
    model = components["transformer"]
    plain_model = models.sd3(qk_norm="rms_norm")  # the same weights, never touched by diffusers' PAG processors
    reference = diffusers.StableDiffusion3PAGPipeline(**components,
                                                      pag_applied_layers=diffusers_layers(model, "blocks.1"))
    pipe = diffusers.StableDiffusion3Pipeline(**components)
    for p in (reference, pipe):
        p.set_progress_bar_config(disable=True)
    kwargs = _kwargs(case, 5.0)

    def unperturbed_rows_difference(calls):
        worst = 0.0
        for arguments, out in calls:
            assert out.shape[0] == 3  # [∅; c; perturbed c]
            rows = {k: v[:2] if torch.is_tensor(v) and v.ndim and v.shape[0] == 3 else v for k, v in arguments.items()}
            plain = type(plain_model).forward(plain_model, **{**rows, "return_dict": False})[0]
            worst = max(worst, float((out[:2] - plain).abs().max()))
        return worst

    calls = _recording_forward(model)
    theirs = reference(**kwargs, pag_scale=2.0, generator=torch.Generator().manual_seed(1)).images
    assert len(calls) == STEPS and unperturbed_rows_difference(calls) > 1e-2
    calls.clear()
    ours = _run(pipe, kwargs, pagkit.PAG(2.0, layers="blocks.1"))
    assert len(calls) == STEPS and unperturbed_rows_difference(calls) < 1e-6
    del model.forward
    assert torch.equal(_run(pipe, kwargs, pagkit.PAG(0.0, layers="blocks.1")), _run(pipe, kwargs))
    assert (theirs - ours).abs().max() > 1e-2

    dual = _sd3(qk_norm="rms_norm", dual_attention_layers=(0, 1))
    layers = diffusers_layers(dual["transformer"], "blocks.1")  # transformer_blocks.1.attn and .attn2
    with pytest.raises(AttributeError, match="ndim"):  # its joint processor on attn2, which has no text input
        diffusers.StableDiffusion3PAGPipeline(**dual, pag_applied_layers=layers)(
            **kwargs, pag_scale=2.0, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_sana15_qk_norm_diffusers_pag_pipeline_skips_it_and_pagkit_does_not(guidance_scale):
    """No parity on Sana 1.5 (QK-norm in its linear attention): diffusers' PAGCFG/PAGIdentitySanaLinearAttn-
    Processor2_0 never apply norm_q/norm_k, so SanaPAGPipeline's unperturbed rows are not the model's prediction
    (max |diff| 0.013 with CFG, 0.011 without, against the plain transformer over 3 steps of this tiny model) and
    its latents end 0.019 (CFG) and 0.022 (no CFG) away from pagkit's. pagkit's unperturbed rows are the plain
    transformer's (to float noise: batch 2 against 1), and its neutral scale is the plain pipeline bit for bit."""
    case = CASES["sana"]
    components = _sana(qk_norm="rms_norm_across_heads")
    model = components["transformer"]
    plain_model = models.sana(qk_norm="rms_norm_across_heads")  # the same weights, never touched by diffusers
    reference = diffusers.SanaPAGPipeline(**components, pag_applied_layers=diffusers_layers(model, "blocks.1"))
    pipe = diffusers.SanaPipeline(**components)
    for p in (reference, pipe):
        p.set_progress_bar_config(disable=True)
    kwargs = _kwargs(case, guidance_scale)
    rows = 2 if guidance_scale > 1 else 1

    def unperturbed_rows_difference(calls):
        worst = 0.0
        for arguments, out in calls:
            assert out.shape[0] == rows + 1  # [(∅;) c; perturbed c]
            args = {k: v[:rows] if torch.is_tensor(v) and v.ndim and v.shape[0] == rows + 1 else v
                    for k, v in arguments.items()}
            plain = type(plain_model).forward(plain_model, **{**args, "return_dict": False})[0]
            worst = max(worst, float((out[:rows] - plain).abs().max().detach()))
        return worst

    calls = _recording_forward(model)
    theirs = reference(**kwargs, pag_scale=2.0, generator=torch.Generator().manual_seed(1)).images
    assert len(calls) == STEPS and unperturbed_rows_difference(calls) > 1e-3
    calls.clear()
    ours = _run(pipe, kwargs, pagkit.PAG(2.0, layers="blocks.1"))
    assert len(calls) == STEPS and unperturbed_rows_difference(calls) < 1e-5  # float noise of batch 2 against 1
    del model.forward
    assert torch.equal(_run(pipe, kwargs, pagkit.PAG(0.0, layers="blocks.1")), _run(pipe, kwargs))
    assert (theirs - ours).abs().max() > 1e-2
