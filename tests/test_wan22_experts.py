"""Wan 2.2's two experts in ``pagkit.attach``: WanPipeline with ``transformer_2`` and ``boundary_ratio`` runs
``transformer`` at t ≥ boundary_ratio · 1000 (high noise, CFG ``guidance_scale``) and ``transformer_2`` below
(``guidance_scale_2``), each with CFG as two calls ("cond", "uncond"). pagkit guides both, each term bound to each
model, against the hand reference of test_pipelines_without_pag (a plain and a fully perturbed forward of the
expert that runs, ε_c + Δ/w with that stage's w), its step counter set to the global step.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

import pagkit
from test_pipelines_without_pag import _HandGuided

sys.path.insert(0, str(Path(__file__).resolve().parent))
import video_models as V  # noqa: E402

STEPS, BOUNDARY, W, W2 = 4, 0.9, 5.0, 3.0


def _pipe():
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=V.wan(seed=0), transformer_2=V.wan(seed=5), boundary_ratio=BOUNDARY)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds=torch.randn(1, 5, 16,
                  generator=g), height=32, width=48, num_frames=9, guidance_scale=W, guidance_scale_2=W2,
                  num_inference_steps=STEPS, output_type="latent")
    return pipe, kwargs


def _high_noise_steps(pipe):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    return int((scheduler.timesteps >= BOUNDARY * scheduler.config.num_train_timesteps).sum())


def _run(pipe, kwargs, *guidance, hands=None):
    generator = torch.Generator().manual_seed(1)
    if hands is not None:
        pipe.transformer.forward, pipe.transformer_2.forward = hands
        try:
            return pipe(**kwargs, generator=generator).frames
        finally:
            del pipe.transformer.forward, pipe.transformer_2.forward
    if not guidance:
        return pipe(**kwargs, generator=generator).frames
    with pagkit.attach(pipe, *guidance):
        return pipe(**kwargs, generator=generator).frames


@torch.no_grad()
@pytest.mark.parametrize("schedule", [{}, dict(start=0.5)], ids=["always", "second_half"])
def test_attach_guides_both_wan22_experts_with_each_stages_cfg_scale(schedule):
    pipe, kwargs = _pipe()
    high = _high_noise_steps(pipe)
    assert 0 < high < STEPS  # both experts run
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        model = getattr(pipe, name)
        model.register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    plain = _run(pipe, kwargs)
    assert calls == {"transformer": 2 * high, "transformer_2": 2 * (STEPS - high)}
    neutral = _run(pipe, kwargs, pagkit.PAG(0.0, layers="blocks.1", **schedule))
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers="blocks.1", **schedule))
    negative = kwargs["negative_prompt_embeds"]
    hand_1 = _HandGuided(pipe.transformer, "blocks.1", 2.0, STEPS, separate_cfg=W, negative=negative, **schedule)
    hand_2 = _HandGuided(pipe.transformer_2, "blocks.1", 2.0, STEPS, separate_cfg=W2, negative=negative, **schedule)
    hand_2.step = high  # the low-noise expert takes over at the global step ``high``
    expected = _run(pipe, kwargs, hands=(hand_1, hand_2))
    assert torch.equal(neutral, plain)
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3
    for model in (pipe.transformer, pipe.transformer_2):
        assert not any("forward" in vars(m) or "cache_context" in vars(m) for m in model.modules())


@torch.no_grad()
def test_only_the_high_noise_expert_guided_differs_so_the_second_expert_is_guided_too():
    pipe, kwargs = _pipe()
    high = _high_noise_steps(pipe)
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers="blocks.1"))
    negative = kwargs["negative_prompt_embeds"]
    hand_1 = _HandGuided(pipe.transformer, "blocks.1", 2.0, STEPS, separate_cfg=W, negative=negative)
    hand_2 = _HandGuided(pipe.transformer_2, "blocks.1", 0.0, STEPS, separate_cfg=W2, negative=negative)
    hand_2.step = high
    first_only = _run(pipe, kwargs, hands=(hand_1, hand_2))
    assert (attached - first_only).abs().max() > 1e-3


def test_a_bad_layer_for_the_second_expert_is_refused_before_sampling_and_both_are_restored():
    pipe, kwargs = _pipe()
    with pytest.raises(ValueError, match="unknown layer"):
        with pagkit.attach(pipe, pagkit.PAG(2.0, layers="blocks.7")):
            pass
    for model in (pipe.transformer, pipe.transformer_2):
        assert "forward" not in vars(model) and "cache_context" not in vars(model)
