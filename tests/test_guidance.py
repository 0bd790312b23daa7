"""Exact equalities the maths promises: neutral scales, batched = separate, restored models, schedules."""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline)

import models
import pagkit
from pagkit.routing import Segment, routed
from pagkit.denoise import GuidedDenoiser

NULL = 10


def _sample(model, guidance, steps=4, **kw):
    return pagkit.sample(model, models.ddim(), batch_size=2, num_inference_steps=steps, guidance=guidance,
                         generator=torch.Generator().manual_seed(0), progress_bar=False, **kw)


@pytest.mark.parametrize("term", [pagkit.PAG(0.0, layers="down.1"), pagkit.SEG(0.0, sigma=2.0, layers="mid"),
                                  pagkit.SAG(0.0, layer="mid"), pagkit.CFG(1.0),
                                  pagkit.PAG(3.0, layers="mid", start=0.9)])
def test_neutral_scale_reproduces_the_unguided_output_exactly(term):
    model = models.unet2d(num_class_embeds=11)
    labels = dict(class_labels=torch.tensor([1, 2]), null_class_label=NULL)
    assert torch.equal(_sample(model, [term], **labels), _sample(model, [], **labels))


def test_neutral_terms_cost_no_forward_work():
    model = models.unet2d()
    denoiser = GuidedDenoiser(model, [pagkit.PAG(0.0), pagkit.SEG(3.0, stop=0.5), pagkit.CFG(1.0)])
    branches, scales, cfg = denoiser.branches(progress=0.75)
    assert [b.name for b in branches] == ["cond"] and scales == {} and cfg is None
    branches, _, _ = denoiser.branches(progress=0.25)
    assert [b.name for b in branches] == ["cond", "seg1"]


def test_batched_forward_equals_separate_forwards_per_branch():
    model = models.unet2d(num_class_embeds=11)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor(400)
    cond, uncond = {"class_labels": torch.tensor([3, 4])}, {"class_labels": torch.tensor([NULL, NULL])}
    terms = [pagkit.CFG(4.0), pagkit.PAG(2.0, layers="down.1"), pagkit.SEG(1.5, sigma=1.0, layers="mid")]
    batched = GuidedDenoiser(model, terms).predict(x, t, cond, uncond)

    def perturbed(selection, perturbation):
        names = pagkit.resolve_layers(model, selection)
        with routed(model, names) as router:
            router.input_hw = (16, 16)
            router.plan = [Segment(0, 2, {n: perturbation for n in names})]
            return model(x, t, **cond).sample

    eps_u, eps_c = model(x, t, **uncond).sample, model(x, t, **cond).sample
    eps_pag = perturbed("down.1", terms[1].make_perturbation())
    eps_seg = perturbed("mid", terms[2].make_perturbation())
    separate = eps_u + 4.0 * (eps_c - eps_u) + 2.0 * (eps_c - eps_pag) + 1.5 * (eps_c - eps_seg)
    torch.testing.assert_close(batched, separate, rtol=0, atol=1e-5)


def test_schedule_interval_and_ramp():
    term = pagkit.PAG(4.0, start=0.25, stop=0.75, scale_end=0.0)
    assert [term.scale_at(p) for p in (0.0, 0.25, 0.5, 0.74999, 0.75)] == pytest.approx([0, 4, 2, 0, 0], abs=1e-3)
    assert pagkit.CFG(5.0, stop=0.5).scale_at(0.6) == 1.0  # CFG's neutral scale is w = 1


def test_interval_matches_switching_guidance_by_hand():
    """PAG on the first half of the steps = PAG-guided steps, then plain steps (same scheduler state)."""
    model, scheduler = models.unet2d(), models.ddim()
    with_interval = _sample(model, [pagkit.PAG(3.0, layers="down.1", stop=0.5)])
    on, off = GuidedDenoiser(model, [pagkit.PAG(3.0, layers="down.1")]), GuidedDenoiser(model, [])
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(4)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step((on if i < 2 else off).predict(x, t), t, x).prev_sample
    assert torch.equal(with_interval, x)


def _pipe_and_unet():
    unet = models.sd_unet()
    pipe = StableDiffusionPipeline(unet=unet, vae=models.vae(), scheduler=models.ddim(), text_encoder=None,
                                   tokenizer=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, unet


def test_attach_restores_model_after_exit_and_after_an_exception():
    pipe, unet = _pipe_and_unet()
    x, t, emb = torch.randn(1, 4, 16, 16), torch.tensor(500), torch.randn(1, 7, 24)
    processors_before = dict(unet.attn_processors)
    out_before = unet(x, t, emb).sample
    kwargs = dict(prompt_embeds=emb, negative_prompt_embeds=emb, num_inference_steps=2, output_type="latent",
                  height=32, width=32)

    with pagkit.attach(pipe, pagkit.PAG(3.0, layers="mid"), pagkit.SAG(0.5)):
        pipe(**kwargs)
    assert "forward" not in vars(unet)

    def explode(*args, **kw):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with pagkit.attach(pipe, pagkit.PAG(3.0, layers="mid")):
            pipe(**kwargs, callback_on_step_end=explode)
    # an error inside the model's forward, while the routing processors are installed
    with pytest.raises(RuntimeError):
        with pagkit.attach(pipe, pagkit.PAG(3.0, layers="mid")):
            unet(x, t, torch.randn(1, 7, 5))  # wrong text-embedding width
    assert "forward" not in vars(unet)
    after = dict(unet.attn_processors)
    assert after.keys() == processors_before.keys()
    assert all(after[k] is processors_before[k] for k in after)
    assert torch.equal(unet(x, t, emb).sample, out_before)


def test_attach_refuses_cfg_and_leaves_nothing_behind_on_bad_layers():
    pipe, unet = _pipe_and_unet()
    with pytest.raises(ValueError, match="set its guidance_scale"):
        with pagkit.attach(pipe, pagkit.CFG(5.0)):
            pass
    with pytest.raises(ValueError, match="unknown layer 'middle'"):
        with pagkit.attach(pipe, pagkit.PAG(3.0, layers="middle")):
            pass
    assert "forward" not in vars(unet)


@pytest.mark.parametrize("pipeline_cls", [StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline])
def test_attach_works_in_img2img_and_inpaint_pipelines(pipeline_cls):
    unet = models.sd_unet(in_channels=9 if pipeline_cls is StableDiffusionInpaintPipeline else 4)
    pipe = pipeline_cls(unet=unet, vae=models.vae(), scheduler=models.ddim(), text_encoder=None, tokenizer=None,
                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(prompt_embeds=torch.randn(1, 7, 24, generator=g), negative_prompt_embeds=torch.zeros(1, 7, 24),
                  image=torch.rand(1, 3, 32, 32, generator=g), num_inference_steps=4, output_type="latent",
                  strength=0.75)
    if pipeline_cls is StableDiffusionInpaintPipeline:
        kwargs.update(mask_image=torch.ones(1, 1, 32, 32), height=32, width=32)
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    with pagkit.attach(pipe, pagkit.PAG(3.0, layers="mid")):
        guided = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    with pagkit.attach(pipe, pagkit.PAG(0.0, layers="mid")):
        neutral = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3
    torch.testing.assert_close(neutral, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler", [
    DDIMScheduler(), DDPMScheduler(), EulerDiscreteScheduler(),
    DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"),
    DDIMScheduler(prediction_type="v_prediction"), EulerDiscreteScheduler(prediction_type="v_prediction")],
    ids=["ddim", "ddpm", "euler", "dpmsolver++", "ddim-v", "euler-v"])
def test_any_diffusers_scheduler_with_pag_sag_and_cfg(scheduler):
    model = models.unet2d(num_class_embeds=11)
    terms = [pagkit.CFG(2.0), pagkit.PAG(2.0, layers="down.1"), pagkit.SAG(0.5, layer="mid")]

    def run(guidance):
        return pagkit.sample(model, scheduler, batch_size=2, num_inference_steps=3, guidance=guidance,
                             class_labels=torch.tensor([1, 2]), null_class_label=NULL,
                             generator=torch.Generator().manual_seed(0), progress_bar=False)
    guided, plain = run(terms), run([])
    assert guided.shape == (2, 1, 16, 16) and torch.isfinite(guided).all()
    assert (guided - plain).abs().max() > 1e-3
    assert torch.equal(run(terms), guided)  # reproducible from the generator


def test_guide_wraps_a_model_with_its_own_signature():
    model = models.unet2d(num_class_embeds=11)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor(300)
    guided = pagkit.guide(model, [pagkit.CFG(3.0), pagkit.PAG(2.0, layers="down.1")],
                          uncond={"class_labels": torch.tensor([NULL, NULL])})
    out = guided(x, t, class_labels=torch.tensor([1, 2]), progress=0.0)
    direct = GuidedDenoiser(model, guided.denoiser.terms).predict(
        x, t, {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([NULL, NULL])})
    assert torch.equal(out.sample, direct)
    assert torch.equal(guided(x, t, class_labels=torch.tensor([1, 2]), return_dict=False)[0], direct)


def test_transformers_dit_and_pixart_take_pag_and_seg():
    dit = models.dit()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    denoiser = GuidedDenoiser(dit, [pagkit.CFG(2.0), pagkit.PAG(2.0, layers="blocks.1"),
                                    pagkit.SEG(2.0, sigma=1.0, layers="blocks.10")])
    out = denoiser.predict(x, t, {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([0, 0])})
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    pixart = models.pixart()
    cond = {"encoder_hidden_states": torch.randn(2, 5, 24),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    out = GuidedDenoiser(pixart, [pagkit.PAG(2.0, layers="blocks.1")]).predict(x, t, cond)
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()


def test_guidance_rescale_pulls_std_back():
    model = models.unet2d(num_class_embeds=11)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor(300)
    cond, uncond = {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([NULL, NULL])}
    terms = [pagkit.CFG(8.0)]
    raw = GuidedDenoiser(model, terms).predict(x, t, cond, uncond)
    full = GuidedDenoiser(model, terms, guidance_rescale=1.0).predict(x, t, cond, uncond)
    eps_c = model(x, t, **cond).sample
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), eps_c.std(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(raw, full)


@pytest.mark.parametrize("pipeline", ["DDIMPipeline", "DDPMPipeline"])
def test_attach_works_on_unconditional_ddim_and_ddpm_pipelines(pipeline):
    import diffusers
    unet = models.unet2d()
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=models.ddim() if pipeline == "DDIMPipeline"
                                        else DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=3, output_type="np")

    def run():
        return torch.from_numpy(pipe(generator=torch.Generator().manual_seed(0), **kwargs).images)
    plain = run()
    with pagkit.attach(pipe, pagkit.PAG(3.0, layers="down.1")):
        guided = run()
    assert (guided - plain).abs().max() > 1e-3
    assert torch.equal(run(), plain)  # restored
    if pipeline == "DDIMPipeline":  # deterministic: pagkit's own loop from the same noise gives the same images
        noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        ours = pagkit.sample(unet, pipe.scheduler, batch_size=2, num_inference_steps=3, latents=noise,
                             guidance=[pagkit.PAG(3.0, layers="down.1")], progress_bar=False)
        ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        torch.testing.assert_close(ours, guided, rtol=0, atol=1e-5)


def test_attach_on_dit_pipeline_uses_its_cond_first_cfg_batch():
    """DiT puts the conditional half first; attach must give ε_u + w(ε_c − ε_u) + s(ε_c − ε̂_c) all the same.

    The reference replaces the transformer by one returning [ε̃, ε̃] (ε̃ from pagkit's own CFG+PAG),
    so that the pipeline's CFG leaves ε̃ unchanged.
    """
    from diffusers import DiTPipeline
    from diffusers.models.unets.unet_2d import UNet2DOutput

    class Reference(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config, self.dtype, self.device = model, model.config, model.dtype, model.device
            self.denoiser = GuidedDenoiser(model, [pagkit.CFG(3.0), pagkit.PAG(2.0, layers="blocks.1")])

        def forward(self, x, timestep, class_labels, return_dict=True):
            half = x.shape[0] // 2
            eps = self.denoiser.predict(x[:half], timestep[:half], {"class_labels": class_labels[:half]},
                                        {"class_labels": class_labels[half:]})
            return UNet2DOutput(sample=torch.cat([eps, eps]))

    dit = models.dit()
    kw = dict(class_labels=[3, 7], guidance_scale=3.0, num_inference_steps=3, output_type="np")
    pipe = DiTPipeline(transformer=dit, vae=models.vae(), scheduler=models.ddim())
    pipe.set_progress_bar_config(disable=True)
    with pagkit.attach(pipe, pagkit.PAG(2.0, layers="blocks.1")):
        attached = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    reference = DiTPipeline(transformer=Reference(dit), vae=pipe.vae, scheduler=pipe.scheduler)
    reference.set_progress_bar_config(disable=True)
    expected = reference(**kw, generator=torch.Generator().manual_seed(0)).images
    assert abs(attached - expected).max() < 1e-4
    assert abs(plain - expected).max() > 1e-3
