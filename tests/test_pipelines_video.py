"""``pagkit.attach`` in video pipelines, with tiny components and prompt embeddings fed directly.

AnimateDiffPipeline against diffusers' AnimateDiffPAGPipeline (given pagkit's sites as anchored names). WanPipeline,
HunyuanVideoPipeline, HunyuanVideo15Pipeline (CFG through a diffusers guider, two named calls), CogVideoXPipeline
and LTXPipeline, which diffusers has no PAG pipeline for, against the hand
reference of test_pipelines_without_pag (a plain forward and a separate fully perturbed forward per step), each with
its own CFG: Wan runs it as a second call named "uncond", HunyuanVideo as a second call with ``true_cfg_scale``
(``guidance_scale`` is a model input), CogVideoX and LTX batch [∅; c]. Their own frame counts: 9 video frames → 3
latent frames (Wan, HunyuanVideo, CogVideoX: ÷ 4), 17 → 3 (LTX: ÷ 8).
"""
from __future__ import annotations

import inspect
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import (AnimateDiffPAGPipeline, AnimateDiffPipeline, CogVideoXDDIMScheduler, CogVideoXPipeline,
                       FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, LTXPipeline, WanPipeline)

import models
import pagkit
from test_pipelines_without_pag import _HandGuided
from test_pipelines_without_pag import _run as run_pipeline
from test_pipelines_without_pag import latents_recorder

sys.path.insert(0, str(Path(__file__).resolve().parent))
import video_models as V  # noqa: E402

STEPS = 3


def _run(pipe, kwargs, *guidance, hand=None, callback=None):
    return run_pipeline(pipe, kwargs, *guidance, hand=hand, callback=callback, output="frames")


# ---- AnimateDiff: diffusers' PAG pipeline as the reference ----

def _animatediff():
    unet = V.animatediff()
    components = dict(vae=models.vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=models.ddim())
    return unet, components


def _animatediff_kwargs(guidance_scale):
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 5, 24, generator=g), negative_prompt_embeds=torch.randn(1, 5, 24, generator=g),
                num_frames=3, height=16, width=24, num_inference_steps=STEPS, output_type="latent",
                guidance_scale=guidance_scale)


def _anchored(names):
    return ["^" + re.escape(n) + "$" for n in names]


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_animatediff_attach_matches_diffusers_animatediff_pag_pipeline(guidance_scale):
    """pagkit's ``mid`` is the mid block's spatial attn1; diffusers is given exactly that site."""
    unet, components = _animatediff()
    spatial = pagkit.resolve_layers(unet, "mid")
    assert spatial == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    reference = AnimateDiffPAGPipeline(**components, motion_adapter=None, pag_applied_layers=_anchored(spatial))
    pipe = AnimateDiffPipeline(**components, motion_adapter=None)
    for p in (reference, pipe):
        p.set_progress_bar_config(disable=True)
    kwargs = _animatediff_kwargs(guidance_scale)
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames
    attached = _run_unet(pipe, kwargs, pagkit.PAG(2.0, layers="mid"))
    neutral = _run_unet(pipe, kwargs, pagkit.PAG(0.0, layers="mid"))
    expected = reference(**kwargs, pag_scale=2.0, generator=torch.Generator().manual_seed(1)).frames
    assert type(pipe) is AnimateDiffPipeline and attached.shape == (1, 4, 3, 8, 12)
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)
    assert torch.equal(neutral, plain)
    assert (plain - expected).abs().max() > 1e-3


def test_animatediff_diffusers_default_mid_also_perturbs_temporal_attention():
    """diffusers' default ``"mid_block.*attn1"`` also takes the mid motion module's temporal attn1: it equals pagkit
    given both sites by name (its row split is right: both foldings keep the sample outermost), not pagkit's ``mid``."""
    unet, components = _animatediff()
    reference = AnimateDiffPAGPipeline(**components, motion_adapter=None)  # the default layers
    pipe = AnimateDiffPipeline(**components, motion_adapter=None)
    for p in (reference, pipe):
        p.set_progress_bar_config(disable=True)
    kwargs = _animatediff_kwargs(5.0)
    both = ["mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block.motion_modules.0.transformer_blocks.0.attn1"]
    expected = reference(**kwargs, pag_scale=2.0, generator=torch.Generator().manual_seed(1)).frames
    torch.testing.assert_close(_run_unet(pipe, kwargs, pagkit.PAG(2.0, layers=both)), expected, rtol=0, atol=1e-4)
    assert (_run_unet(pipe, kwargs, pagkit.PAG(2.0, layers="mid")) - expected).abs().max() > 1e-2


def _run_unet(pipe, kwargs, *guidance):
    with pagkit.attach(pipe, *guidance):
        return pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames


# ---- Wan, HunyuanVideo, CogVideoX, LTX: the hand reference ----

def _embeds(n, d, g):
    return torch.randn(1, n, d, generator=g)


def _wan(cfg):
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=V.wan())
    g = torch.Generator().manual_seed(0)
    kwargs = dict(prompt_embeds=_embeds(5, 16, g), negative_prompt_embeds=_embeds(5, 16, g), height=32, width=48,
                  num_frames=9, guidance_scale=5.0 if cfg else 1.0)
    return pipe, kwargs, "blocks.1", dict(separate_cfg=5.0, negative=kwargs["negative_prompt_embeds"]) if cfg else {}


def _hunyuan_video(cfg):
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=V.hunyuan_video(), vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 5, dtype=torch.long)
    mask[:, -1] = 0
    kwargs = dict(prompt_embeds=_embeds(5, 16, g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                  prompt_attention_mask=mask, height=32, width=48, num_frames=9, guidance_scale=6.0)
    if cfg:
        kwargs.update(negative_prompt_embeds=_embeds(5, 16, g), negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                      negative_prompt_attention_mask=mask, true_cfg_scale=4.0)
    layers = ["double.1", "single.0"]
    return pipe, kwargs, layers, dict(separate_cfg=4.0, negative=kwargs["negative_prompt_embeds"]) if cfg else {}


def _cogvideox(cfg):
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=V.cogvideox(),
                             scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"))
    g = torch.Generator().manual_seed(0)
    kwargs = dict(prompt_embeds=_embeds(5, 16, g), negative_prompt_embeds=_embeds(5, 16, g), height=64, width=96,
                  num_frames=9, guidance_scale=6.0 if cfg else 1.0)
    return pipe, kwargs, "blocks.1", dict(batched_cfg=6.0) if cfg else {}


def _hunyuan_video15(cfg):
    """CFG through diffusers' ClassifierFreeGuidance guider: two calls per step, named pred_cond / pred_uncond."""
    from diffusers import HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=V.hunyuan_video15(in_channels=9),
                                  vae=V.hunyuan_video15_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                  text_encoder_2=None, tokenizer_2=None,
                                  guider=ClassifierFreeGuidance(guidance_scale=6.0 if cfg else 1.0))
    g = torch.Generator().manual_seed(0)
    mask, mask_2 = torch.ones(1, 5, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    mask[:, -1] = 0
    kwargs = dict(prompt_embeds=_embeds(5, 16, g), prompt_embeds_mask=mask, prompt_embeds_2=_embeds(4, 8, g),
                  prompt_embeds_mask_2=mask_2, negative_prompt_embeds=_embeds(5, 16, g),
                  negative_prompt_embeds_mask=mask, negative_prompt_embeds_2=_embeds(4, 8, g),
                  negative_prompt_embeds_mask_2=mask_2, height=64, width=96, num_frames=9)
    return pipe, kwargs, "double.1", dict(separate_cfg=6.0, negative=kwargs["negative_prompt_embeds"]) if cfg else {}


def _ltx(cfg):
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                       transformer=V.ltx())
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 5)
    kwargs = dict(prompt_embeds=_embeds(5, 16, g), prompt_attention_mask=mask, negative_prompt_embeds=_embeds(5, 16, g),
                  negative_prompt_attention_mask=mask, height=128, width=192, num_frames=17,
                  guidance_scale=3.0 if cfg else 1.0)
    return pipe, kwargs, "blocks.1", dict(batched_cfg=3.0) if cfg else {}


PIPELINES = {"wan": _wan, "hunyuan_video": _hunyuan_video, "hunyuan_video15": _hunyuan_video15,
             "cogvideox": _cogvideox, "ltx": _ltx}


def _setup(name, cfg, steps=STEPS):
    pipe, kwargs, layers, hand = PIPELINES[name](cfg)
    pipe.set_progress_bar_config(disable=True)
    kwargs.update(num_inference_steps=steps, output_type="latent")
    return pipe, kwargs, layers, hand


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("name", PIPELINES)
def test_video_pipeline_neutral_is_plain_and_pag_equals_the_hand_reference(name, cfg):
    pipe, kwargs, layers, hand = _setup(name, cfg)
    plain = _run(pipe, kwargs)
    neutral = _run(pipe, kwargs, pagkit.PAG(0.0, layers=layers))
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers=layers))
    expected = _run(pipe, kwargs, hand=_HandGuided(pipe.transformer, layers, 2.0, STEPS, **hand))
    assert torch.equal(neutral, plain)
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3
    assert not any("forward" in vars(m) for m in pipe.transformer.modules())


def test_hunyuan_video15_guiders_other_than_plain_cfg_are_refused():
    """A guider that is itself a method (diffusers' PAG, APG) or rescales would change what pagkit's terms are
    added to: one error naming it, before any step."""
    from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance
    pipe, kwargs, layers, _ = _setup("hunyuan_video15", True)
    for guider, message in ((AdaptiveProjectedGuidance(guidance_scale=6.0), "guider is AdaptiveProjectedGuidance"),
                            (ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=0.7), "guidance_rescale=0.7")):
        pipe.guider = guider
        with pytest.raises(ValueError, match=message):
            with pagkit.attach(pipe, pagkit.PAG(2.0, layers=layers)):
                pass
        assert "forward" not in vars(pipe.transformer)


@contextmanager
def _recording_steps(pipe, into: list):
    """Yields the step callback that appends the latents after each step to ``into``; for a pipeline without
    ``callback_on_step_end`` (HunyuanVideo 1.5) records the scheduler's steps instead and yields None."""
    if "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters:
        yield latents_recorder(into)
        return
    step = pipe.scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        into.append((out[0] if isinstance(out, tuple) else out.prev_sample).clone())
        return out
    pipe.scheduler.step = recording_step
    try:
        yield None
    finally:
        del pipe.scheduler.step


def test_cogvideox_dynamic_cfg_divides_by_each_steps_own_scale():
    """``use_dynamic_cfg=True``: CogVideoX sets w(t) = 1 + g·(1 − cos(π((N − t)/N)⁵))/2 only after the model call,
    so reading the pipeline's scale at the call would divide Δ by the previous step's w. The reference is that
    formula, written here from the pipeline's code, at each step's own t."""
    import math
    pipe, kwargs, layers, _ = _setup("cogvideox", True, steps=4)
    kwargs["use_dynamic_cfg"] = True

    def w(timestep):
        t = float(timestep.flatten()[0])
        return 1 + 6.0 * ((1 - math.cos(math.pi * ((4 - t) / 4) ** 5.0)) / 2)

    pipe.scheduler.set_timesteps(4)
    scales = [w(t) for t in pipe.scheduler.timesteps]
    assert max(scales) - min(scales) > 1.0  # the scale does move between steps here
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers=layers))
    expected = _run(pipe, kwargs, hand=_HandGuided(pipe.transformer, layers, 2.0, 4, batched_cfg=w))
    static = _run(pipe, kwargs, hand=_HandGuided(pipe.transformer, layers, 2.0, 4, batched_cfg=6.0))
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)
    assert (attached - static).abs().max() > 1e-3
    assert torch.equal(_run(pipe, kwargs, pagkit.PAG(0.0, layers=layers)), _run(pipe, kwargs))


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("schedule", [dict(start=0.5), dict(stop=0.5)])
def test_video_pipeline_intervals_follow_the_scheduler_steps(name, schedule):
    """Progress is the step index ÷ N, found in each pipeline's own scheduler timesteps (flow matching for Wan,
    HunyuanVideo and LTX, which call the model with the scheduler's t; CogVideoX's DDIM). With start=0.5 of 4 steps
    the latents after steps 1 and 2 are the plain pipeline's exactly."""
    pipe, kwargs, layers, hand = _setup(name, True, steps=4)

    plain, attached, expected = [], [], []
    with _recording_steps(pipe, plain) as callback:
        _run(pipe, kwargs, callback=callback)
    with _recording_steps(pipe, attached) as callback:
        _run(pipe, kwargs, pagkit.PAG(2.0, layers=layers, **schedule), callback=callback)
    with _recording_steps(pipe, expected) as callback:
        _run(pipe, kwargs, hand=_HandGuided(pipe.transformer, layers, 2.0, 4, **hand, **schedule), callback=callback)
    assert len(attached) == 4
    for a, e in zip(attached, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-4)
    same = [torch.equal(a, p) for a, p in zip(attached, plain)]
    assert same == ([True, True, False, False] if "start" in schedule else [False] * 4)
