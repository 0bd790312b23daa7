"""``pagkit.attach`` on LTX2Pipeline: video and audio guided together, each stream divided by its own factor.

LTX2Pipeline forms, per stream in x̂₀ = x − σv, x̂₀_c + [CFG](w − 1)(x̂₀_c − x̂₀_u) + [STG] s(x̂₀_c − x̂₀_stg)
+ [modality](m − 1)(x̂₀_c − x̂₀_mod): x̂₀_c enters with the factor 1 + [CFG](w − 1) + [STG]s + [mod](m − 1), so the
conditional rows get v_c + Δ/factor for the step to add exactly Δ. The reference here is written by hand: a
plain forward and a fully perturbed forward, both streams, at every call that is not the pipeline's own STG or
modality-isolation pass.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pagkit
from pagkit.backends import detect
from pagkit.perturb import Identity
from pagkit.routing import Segment, routed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import video_models as V  # noqa: E402

LAYERS = "blocks.1"


class _HandLTX2:
    """The transformer's forward with PAG(scale) on ``layers`` by hand, for both streams."""

    def __init__(self, model, scale, video_factor, audio_factor, cfg):
        self.model, self.scale, self.factors, self.cfg = model, scale, (video_factor, audio_factor), cfg
        self.names = pagkit.resolve_layers(model, LAYERS)
        self.forward = type(model).forward.__get__(model)

    def __call__(self, **kwargs):
        kwargs["return_dict"] = False
        video, audio = self.forward(**kwargs)
        if kwargs.get("spatio_temporal_guidance_blocks") or kwargs.get("isolate_modalities"):
            return video, audio  # the pipeline's own STG and modality passes
        backend = detect(self.model)
        with routed(self.model, self.names, backend) as router:
            router.info = backend.forward_info(self.model, kwargs["hidden_states"], kwargs)
            router.plan = [Segment(0, video.shape[0], {n: Identity() for n in self.names})]
            video_p, audio_p = self.forward(**kwargs)
        rows = slice(video.shape[0] // 2, None) if self.cfg else slice(None)
        out = []
        for eps, perturbed, factor in zip((video, audio), (video_p, audio_p), self.factors):
            eps = eps.clone()
            eps[rows] = eps[rows] + self.scale * (eps[rows] - perturbed[rows]) / factor
            out.append(eps)
        return tuple(out)


def _run(pipe, kwargs, *guidance, hand=None):
    generator = torch.Generator().manual_seed(1)
    if hand is not None:
        pipe.transformer.forward = hand
        try:
            out = pipe(**kwargs, generator=generator)
        finally:
            del pipe.transformer.forward
    elif guidance:
        with pagkit.attach(pipe, *guidance):
            out = pipe(**kwargs, generator=generator)
    else:
        out = pipe(**kwargs, generator=generator)
    return out.frames, out.audio


# settings → (video factor, audio factor, CFG batch); every audio setting given, as the pipeline's audio defaults
# (STG 1, modality 3) are on even when the video's are off
CASES = {
    "cfg": (dict(guidance_scale=3.0, audio_guidance_scale=5.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0,
                 audio_modality_scale=1.0), (3.0, 5.0, True)),
    "cfg+stg+modality": (dict(guidance_scale=3.0, audio_guidance_scale=5.0, stg_scale=1.0, audio_stg_scale=0.5,
                              modality_scale=2.0, audio_modality_scale=2.0, spatio_temporal_guidance_blocks=[0]),
                         (5.0, 6.5, True)),
    "modality-only": (dict(guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0,
                           modality_scale=3.0, audio_modality_scale=2.0), (3.0, 2.0, False)),
    # the pipeline's defaults otherwise: modality 3 for both streams; audio w 7 and STG 1 (so the STG pass runs)
    "defaults": (dict(guidance_scale=3.0, stg_scale=0.0), (1 + 2 + 0 + 2, 1 + 6 + 1 + 2, True)),
}


@pytest.mark.parametrize("case", CASES)
def test_ltx2_pipeline_guides_both_streams_with_each_streams_factor(case):
    settings, (video_factor, audio_factor, cfg) = CASES[case]
    pipe, kwargs = V.ltx2_pipeline()
    kwargs.update(settings)
    plain = _run(pipe, kwargs)
    assert plain[0].shape == (1, 4, 3, 16, 32) and plain[1].shape == (1, 2, 16, 4)
    neutral = _run(pipe, kwargs, pagkit.PAG(0.0, layers=LAYERS))
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers=LAYERS))
    expected = _run(pipe, kwargs, hand=_HandLTX2(pipe.transformer, 2.0, video_factor, audio_factor, cfg))
    for n, a, e, p in zip(neutral, attached, expected, plain):
        assert torch.equal(n, p)
        torch.testing.assert_close(a, e, rtol=0, atol=1e-4)
        assert (a - p).abs().max() > 1e-3  # both streams are guided
    assert not any("forward" in vars(m) for m in pipe.transformer.modules())


def test_ltx2_pipeline_refuses_what_cannot_be_added_exactly():
    pipe, kwargs = V.ltx2_pipeline()
    kwargs.update(guidance_scale=3.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0)
    with pytest.raises(ValueError, match="guidance_rescale"):
        _run(pipe, {**kwargs, "guidance_rescale": 0.7, "audio_guidance_rescale": None}, pagkit.PAG(2.0, layers=LAYERS))
    with pytest.raises(ValueError, match="SAG needs the scheduler"):
        _run(pipe, kwargs, pagkit.SAG(1.0, layer="blocks.1"))
    assert "forward" not in vars(pipe.transformer)
