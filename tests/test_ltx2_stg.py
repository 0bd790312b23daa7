"""LTX-2's own STG as the reference for ``pagkit.STG`` on ``LTX2VideoTransformer3DModel``.

diffusers' LTX-2 STG is in the model: ``spatio_temporal_guidance_blocks=[i]`` makes the video and audio
self-attention of block i return their values (``LTX2PerturbedAttnProcessor``, ``all_perturbed``), and the
pipeline (pipelines/ltx2/pipeline_ltx2.py) or ``guiders/ltx2_guidance.py``'s ``LTX2Guidance`` combines the passes
in x0 space, x0 = x − σ·v:

    pred = pred_cond + (gs - 1) * (pred_cond - pred_uncond) + stg_scale * (pred_cond - pred_cond_stg)

An LTX2Pipeline cannot be built here without the hub (its text encoder is a Gemma-3 checkpoint), so the reference
is that guider itself, run on the model's own three passes (cond, uncond, cond with its STG blocks), against
pagkit's one batched forward. As x0 is affine in v with one σ for all passes, the same formula in v space is the
same guidance; the test converts as the pipeline does.
"""
import torch
from diffusers.guiders import LTX2Guidance

import pagkit
import video_models as V
from pagkit.denoise import GuidedDenoiser

SIGMA = 0.7  # the scheduler's σ at this step; any σ > 0 gives the same velocity


def _setup(perturbed_attn=True):
    model = V.ltx2(perturbed_attn=perturbed_attn)
    x, t, cond = V.ltx2_inputs()
    g = torch.Generator().manual_seed(7)
    uncond = {**cond, "encoder_hidden_states": torch.randn(cond["encoder_hidden_states"].shape, generator=g),
              "audio_encoder_hidden_states": torch.randn(cond["audio_encoder_hidden_states"].shape, generator=g)}
    return model, x, t, cond, uncond


def _video(model, x, t, kwargs, **extra):
    return model(x, timestep=t, **kwargs, **extra, return_dict=False)[0]


@torch.no_grad()
def test_stg_attention_on_block_indices_equals_ltx2s_own_stg_through_its_guider():
    model, x, t, cond, uncond = _setup()
    x0 = lambda v: x - SIGMA * v  # noqa: E731  (the pipeline's convert_velocity_to_x0)
    guider = LTX2Guidance(guidance_scale=3.0, stg_scale=1.5, spatio_temporal_guidance_blocks=[1])
    pred = guider.forward(x0(_video(model, x, t, cond)), x0(_video(model, x, t, uncond)),
                          x0(_video(model, x, t, cond, spatio_temporal_guidance_blocks=[1]))).pred
    expected = (x - pred) / SIGMA  # convert_x0_to_velocity

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return model(*args, **kwargs)
    terms = [pagkit.CFG(3.0), pagkit.STG(1.5, layers=[1], mode="attention")]
    ours = GuidedDenoiser(model, terms, forward=counting).predict(x, t, cond, uncond)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    assert calls == [3 * x.shape[0]]  # [∅; c; STG] in one forward
    # block indices take the block's video and audio self-attention, as the model's own STG does
    assert GuidedDenoiser(model, terms).methods[1].branches(1.5)[0].patches.keys() == {
        "transformer_blocks.1.attn1", "transformer_blocks.1.audio_attn1"}


@torch.no_grad()
def test_video_only_stg_differs_from_the_models_own_and_ltx20_processors_ignore_its_stg():
    model, x, t, cond, _ = _setup()
    eps = _video(model, x, t, cond)
    own = _video(model, x, t, cond, spatio_temporal_guidance_blocks=[1])
    video_only = GuidedDenoiser(model, [pagkit.STG(1.0, layers="transformer_blocks.1", mode="attention",
                                                   kind="spatiotemporal")]).predict(x, t, cond)
    assert (video_only - (2 * eps - own)).abs().max() > 1e-3  # the audio self-attention matters to the video
    # a model built without perturbed_attn (LTX-2.0's processors) drops spatio_temporal_guidance_blocks: the
    # model's own STG pass is the conditional pass, bit for bit, so diffusers' STG adds nothing there; pagkit's
    # STG perturbs at the attention call and acts on either
    plain = V.ltx2(perturbed_attn=False)
    assert torch.equal(_video(plain, x, t, cond, spatio_temporal_guidance_blocks=[1]), _video(plain, x, t, cond))
    ours = GuidedDenoiser(plain, [pagkit.STG(1.0, layers=[1], mode="attention")]).predict(x, t, cond)
    assert (ours - _video(plain, x, t, cond)).abs().max() > 1e-3


@torch.no_grad()
def test_stg_residual_skips_ltx2_blocks_returning_video_and_audio_inputs():
    model, x, t, cond, _ = _setup()
    eps = _video(model, x, t, cond)
    ours = GuidedDenoiser(model, [pagkit.STG(2.0, layers=[1])]).predict(x, t, cond)
    block = model.transformer_blocks[1]
    block.forward = lambda hidden_states, audio_hidden_states, *a, **k: (hidden_states, audio_hidden_states)
    try:
        skipped = _video(model, x, t, cond)
    finally:
        del block.forward
    torch.testing.assert_close(ours, eps + 2.0 * (eps - skipped), rtol=0, atol=1e-5)
    neutral = GuidedDenoiser(model, [pagkit.STG(0.0, layers=[1], mode="attention")]).predict(x, t, cond)
    assert torch.equal(neutral, eps)
