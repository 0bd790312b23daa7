"""pagkit against diffusers' own PAG and SAG pipelines: same seed, same latents.

Every other diffusers PAG pipeline: tests/test_pipelines_parity.py."""
import pytest
import torch
from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline

import models
import pagkit


def _pipes():
    unet, vae, scheduler = models.sd_unet(), models.vae(), models.ddim()
    common = dict(unet=unet, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None,
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference = StableDiffusionPAGPipeline(**common, pag_applied_layers=["mid"])
    pipe = StableDiffusionPipeline(**common)
    for p in (reference, pipe):
        p.set_progress_bar_config(disable=True)
    return reference, pipe


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_attach_and_sample_match_diffusers_pag_pipeline(guidance_scale):
    reference, pipe = _pipes()
    g = torch.Generator().manual_seed(0)
    emb, neg = torch.randn(2, 7, 24, generator=g), torch.randn(2, 7, 24, generator=g)
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=5, output_type="latent",
              guidance_scale=guidance_scale, height=32, width=32)

    expected = reference(**kw, pag_scale=3.0, generator=torch.Generator().manual_seed(1)).images
    with pagkit.attach(pipe, pagkit.PAG(3.0, layers="mid")):
        attached = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
    terms = [pagkit.PAG(3.0, layers="mid")] + ([pagkit.CFG(guidance_scale)] if guidance_scale > 1 else [])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sampled = pagkit.sample(pipe.unet, pipe.scheduler, batch_size=2, num_inference_steps=5, guidance=terms,
                            latents=latents, encoder_hidden_states=emb, negative_encoder_hidden_states=neg,
                            progress_bar=False)
    plain = pipe(**kw, generator=torch.Generator().manual_seed(1)).images

    assert (attached - expected).abs().max() < 1e-4
    assert (sampled - expected).abs().max() < 1e-4
    assert (plain - expected).abs().max() > 1e-2  # PAG changed the result: the comparison is not vacuous


def test_identity_perturbation_matches_diffusers_pag_processor():
    """The perturbed slice computes exactly to_out(to_v(x)), as diffusers' PAGIdentitySelfAttnProcessor2_0."""
    from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0

    from pagkit.perturb import Identity
    from pagkit.routing import perturbed_call
    unet = models.unet2d()
    attn = unet.mid_block.attentions[0]
    x = torch.randn(4, 32, 4, 4)
    expected = PAGIdentitySelfAttnProcessor2_0()(attn, x)  # rows 0:2 normal, rows 2:4 perturbed
    ours = perturbed_call(attn, x[2:], Identity())
    torch.testing.assert_close(ours, expected[2:], rtol=0, atol=1e-6)


def test_query_blur_matches_diffusers_sag_gaussian_blur():
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d

    from pagkit.perturb import gaussian_blur
    img = torch.randn(2, 3, 16, 20)
    torch.testing.assert_close(gaussian_blur(img, 1.0, 9), gaussian_blur_2d(img, 9, 1.0), rtol=0, atol=1e-6)


def _latents_pair(reference, pipe, terms, ref_kwargs, kwargs):
    for p in (reference, pipe):
        p.set_progress_bar_config(disable=True)
    expected = reference(**kwargs, **ref_kwargs, generator=torch.Generator().manual_seed(1)).images
    with pagkit.attach(pipe, *terms):
        attached = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    return expected, attached, plain


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_sag_matches_diffusers_sag_pipeline(guidance_scale):
    from diffusers import StableDiffusionSAGPipeline
    common = dict(unet=models.sd_unet(), vae=models.vae(), scheduler=models.ddim(), text_encoder=None,
                  tokenizer=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(prompt_embeds=torch.randn(1, 7, 24, generator=g),
                  negative_prompt_embeds=torch.randn(1, 7, 24, generator=g), num_inference_steps=3,
                  output_type="latent", guidance_scale=guidance_scale, height=32, width=32)
    expected, attached, plain = _latents_pair(
        StableDiffusionSAGPipeline(**common), StableDiffusionPipeline(**common),
        [pagkit.SAG(0.75, layer="mid")], {"sag_scale": 0.75}, kwargs)
    assert (attached - expected).abs().max() < 1e-4 < (plain - expected).abs().max()
