"""``pagkit.attach`` in joint-attention pipelines diffusers has no PAG pipeline for: Flux, SD3.5, Qwen-Image.

Each run is checked against a reference computed here: the pipeline with its transformer's forward replaced by
``_HandGuided``, which forms ε̃ from a plain forward and a separate fully perturbed forward (pagkit's routing
perturbs; the contract tests check that against an explicit-mask attention) and counts the steps itself.
Flux runs CFG not at all (guidance-distilled: ``guidance_scale`` is a model input) or as a second,
unconditional call (``true_cfg_scale`` with a negative prompt), as Qwen-Image does; SD3.5 batches [∅; c] as SD3 does.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline, StableDiffusion3Pipeline

import models
import pagkit
from pagkit.backends import detect
from pagkit.perturb import Identity
from pagkit.routing import Segment, routed

STEPS = 3
FLUX_LAYERS = ["double.1", "single.0"]  # one joint and one single-stream site


class _HandGuided:
    """A transformer forward that returns the guided ε of PAG(scale, layers, start, stop), computed by hand.

    ``batched_cfg=w``: the pipeline sends [∅; c] and applies w itself, so the conditional half gets ε_c + Δ/w.
    ``separate_cfg=w`` with ``negative``: calls whose text is ``negative`` are the unconditional ones
    (plain ε_u); the others get ε_c + Δ/w. Otherwise ε_c + Δ. Δ = s(ε_c − ε̂_c); the step is the count of
    conditional calls.
    """

    def __init__(self, model, layers, scale, steps, *, start=0.0, stop=1.0, batched_cfg=None, separate_cfg=None,
                 negative=None):
        self.model, self.scale, self.steps, self.start, self.stop = model, scale, steps, start, stop
        self.names = pagkit.resolve_layers(model, layers)
        self.batched_cfg, self.separate_cfg, self.negative = batched_cfg, separate_cfg, negative
        self.forward = type(model).forward.__get__(model)
        self.step = 0

    def perturbed(self, kwargs):
        backend = detect(self.model)
        x = kwargs["hidden_states"]
        with routed(self.model, self.names, backend) as router:
            router.info = backend.forward_info(self.model, x, kwargs)
            router.plan = [Segment(0, x.shape[0], {n: Identity() for n in self.names})]
            return self.forward(**kwargs)[0]

    def __call__(self, **kwargs):
        kwargs["return_dict"] = False
        eps = self.forward(**kwargs)[0]
        if self.negative is not None and torch.equal(kwargs["encoder_hidden_states"], self.negative):
            return (eps,)
        progress, self.step = self.step / self.steps, self.step + 1
        if not self.start <= progress < self.stop:
            return (eps,)
        delta = self.scale * (eps - self.perturbed(kwargs))
        if self.batched_cfg is not None:  # a number, or w(t) of the model's timestep (dynamic CFG)
            w = self.batched_cfg(kwargs["timestep"]) if callable(self.batched_cfg) else self.batched_cfg
            half = eps.shape[0] // 2
            return (torch.cat([eps[:half], eps[half:] + delta[half:] / w]),)
        return (eps + delta / (self.separate_cfg or 1.0),)


def latents_recorder(into: list):
    """A pipeline step callback that appends a copy of the latents after each step to ``into``."""
    def callback(pipe, i, t, tensors):
        into.append(tensors["latents"].clone())
        return tensors
    return callback


def _run(pipe, kwargs, *guidance, hand=None, callback=None, output="images"):
    """The pipeline's ``output`` (images; frames for video) from seed 1: plain, with ``hand`` as the transformer's
    forward, or under ``pagkit.attach(pipe, *guidance)``."""
    extra = {} if callback is None else dict(callback_on_step_end=callback)
    generator = torch.Generator().manual_seed(1)
    if hand is not None:
        pipe.transformer.forward = hand
        try:
            return getattr(pipe(**kwargs, **extra, generator=generator), output)
        finally:
            del pipe.transformer.forward
    if not guidance:
        return getattr(pipe(**kwargs, **extra, generator=generator), output)
    with pagkit.attach(pipe, *guidance):
        return getattr(pipe(**kwargs, **extra, generator=generator), output)


def _flux_scheduler():
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def _flux(mode: str):
    """FluxPipeline and its inputs: ``distilled`` (guidance embedding, two images per prompt, no CFG) or
    ``true_cfg`` (no guidance embedding, a negative prompt, true_cfg_scale=4)."""
    distilled = mode == "distilled"
    pipe = FluxPipeline(scheduler=_flux_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=models.flux(guidance_embeds=distilled))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 24, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 12, generator=g), height=48, width=64,  # 3×4 packed tokens
                  num_inference_steps=STEPS, output_type="latent")
    if distilled:
        kwargs.update(guidance_scale=3.5, num_images_per_prompt=2)
    else:
        kwargs.update(true_cfg_scale=4.0, negative_prompt_embeds=torch.randn(1, 5, 24, generator=g),
                      negative_pooled_prompt_embeds=torch.randn(1, 12, generator=g))
    return pipe, kwargs


def _hand_for_flux(pipe, kwargs, scale, **schedule):
    return _HandGuided(pipe.transformer, FLUX_LAYERS, scale, kwargs["num_inference_steps"], **schedule,
                       separate_cfg=kwargs.get("true_cfg_scale"), negative=kwargs.get("negative_prompt_embeds"))


@pytest.mark.parametrize("mode", ["distilled", "true_cfg"])
def test_flux_neutral_scale_is_the_plain_pipeline_and_pag_equals_the_hand_reference(mode):
    pipe, kwargs = _flux(mode)
    plain = _run(pipe, kwargs)
    neutral = _run(pipe, kwargs, pagkit.PAG(0.0, layers=FLUX_LAYERS))
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers=FLUX_LAYERS))
    expected = _run(pipe, kwargs, hand=_hand_for_flux(pipe, kwargs, 2.0))
    assert torch.equal(neutral, plain)
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3
    assert type(pipe) is FluxPipeline and "cache_context" not in vars(pipe.transformer)


def test_flux_true_cfg_adds_pag_to_the_conditional_call_only():
    """Each step: the conditional call runs [c; c perturbed] in one forward, the unconditional one runs alone."""
    pipe, kwargs = _flux("true_cfg")
    model = pipe.transformer
    forward = type(model).forward.__get__(model)
    batches = []

    def recording(*args, **kw):
        call = inspect.signature(forward).bind(*args, **kw).arguments
        batches.append((call["hidden_states"].shape[0],
                        torch.equal(call["encoder_hidden_states"], kwargs["negative_prompt_embeds"])))
        return forward(*args, **kw)
    recording.__wrapped__ = forward  # the model's signature, which attach binds
    model.forward = recording  # attach wraps this forward, so it sees what attach sends the model
    try:
        _run(pipe, kwargs, pagkit.PAG(2.0, layers=FLUX_LAYERS))
    finally:
        del model.forward
    assert batches == [(2, False), (1, True)] * STEPS


def test_flux_img2img_true_cfg_without_cache_context():
    """FluxImg2ImgPipeline names no cache_context: attach tells its calls apart by order (conditional first)."""
    vae = models.vae(latent_channels=2, shift_factor=0.1)
    pipe = FluxImg2ImgPipeline(scheduler=_flux_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=models.flux())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 24, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 12, generator=g),
                  negative_prompt_embeds=torch.randn(1, 5, 24, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 12, generator=g), true_cfg_scale=4.0,
                  image=torch.rand(1, 3, 24, 32, generator=g), strength=0.75, height=24, width=32,
                  num_inference_steps=4, output_type="latent")
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers=FLUX_LAYERS))
    expected = _run(pipe, kwargs, hand=_HandGuided(pipe.transformer, FLUX_LAYERS, 2.0, 3, separate_cfg=4.0,
                                                   negative=kwargs["negative_prompt_embeds"]))
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)
    assert (_run(pipe, kwargs) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["distilled", "true_cfg"])
@pytest.mark.parametrize("schedule", [dict(start=0.5), dict(stop=0.5)])
def test_flux_intervals_follow_the_flow_matching_steps(mode, schedule):
    """Flux calls the transformer with t/1000 and its scheduler's timesteps are σ·1000: progress = step index ÷ N.

    With start=0.5 of 4 steps, the latents after steps 1 and 2 are the plain pipeline's exactly, and the hand
    reference (which counts steps) agrees at every step.
    """
    pipe, kwargs = _flux(mode)
    kwargs["num_inference_steps"] = 4

    plain, attached, expected = [], [], []
    _run(pipe, kwargs, callback=latents_recorder(plain))
    _run(pipe, kwargs, pagkit.PAG(2.0, layers=FLUX_LAYERS, **schedule), callback=latents_recorder(attached))
    _run(pipe, kwargs, hand=_hand_for_flux(pipe, kwargs, 2.0, **schedule), callback=latents_recorder(expected))
    for a, e in zip(attached, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-4)
    same = [torch.equal(a, p) for a, p in zip(attached, plain)]
    assert same == ([True, True, False, False] if "start" in schedule else [False] * 4)


def _sd35():
    pipe = StableDiffusion3Pipeline(transformer=models.sd3(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
                                    vae=models.vae(shift_factor=0.1), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 24, generator=g),
                  negative_prompt_embeds=torch.randn(1, 5, 24, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 12, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 12, generator=g), height=32, width=32,
                  num_inference_steps=STEPS, output_type="latent")
    return pipe, kwargs


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_sd35_pipeline_neutral_scale_is_plain_and_pag_equals_the_hand_reference(guidance_scale):
    """StableDiffusion3Pipeline with an SD3.5-shaped transformer (RMS QK-norm, dual attention): blocks.1 is its
    joint ``attn`` and its self-attention ``attn2``."""
    pipe, kwargs = _sd35()
    kwargs["guidance_scale"] = guidance_scale
    w = guidance_scale if guidance_scale > 1 else None
    assert pagkit.resolve_layers(pipe.transformer, "blocks.1") == ["transformer_blocks.1.attn",
                                                                   "transformer_blocks.1.attn2"]
    plain = _run(pipe, kwargs)
    neutral = _run(pipe, kwargs, pagkit.PAG(0.0, layers="blocks.1"))
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers="blocks.1"))
    expected = _run(pipe, kwargs, hand=_HandGuided(pipe.transformer, "blocks.1", 2.0, STEPS, batched_cfg=w))
    assert torch.equal(neutral, plain)
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3


def _qwenimage(true_cfg: bool):
    """QwenImagePipeline (no VAE: latents at 1/8, packed 2×2 → a 3×4 token grid at 48×64) and its inputs; with
    ``true_cfg`` a negative prompt whose last two tokens are padding (a text mask) and true_cfg_scale=4."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=_flux_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=models.qwenimage())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long),
                  height=48, width=64, num_inference_steps=STEPS, output_type="latent")
    if true_cfg:
        mask = torch.ones(1, 5, dtype=torch.long)
        mask[:, -2:] = 0
        kwargs.update(true_cfg_scale=4.0, negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
                      negative_prompt_embeds_mask=mask)
    return pipe, kwargs


@pytest.mark.parametrize("true_cfg", [True, False])
def test_qwenimage_neutral_scale_is_the_plain_pipeline_and_pag_equals_the_hand_reference(true_cfg):
    """QwenImagePipeline runs true CFG as a second, unconditional call (then rescales the combined prediction to
    the conditional one's norm); without a negative prompt it runs the conditional call alone."""
    pipe, kwargs = _qwenimage(true_cfg)
    layers = ["blocks.0", "blocks.1"]
    plain = _run(pipe, kwargs)
    neutral = _run(pipe, kwargs, pagkit.PAG(0.0, layers=layers))
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers=layers))
    expected = _run(pipe, kwargs, hand=_HandGuided(pipe.transformer, layers, 2.0, STEPS,
                                                   separate_cfg=kwargs.get("true_cfg_scale"),
                                                   negative=kwargs.get("negative_prompt_embeds")))
    assert pagkit.resolve_layers(pipe.transformer, layers) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert torch.equal(neutral, plain)
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3


def test_qwenimage_true_cfg_adds_pag_to_the_conditional_call_only():
    """Each step: the conditional call runs [c; c perturbed] in one forward, the unconditional one runs alone."""
    pipe, kwargs = _qwenimage(true_cfg=True)
    model = pipe.transformer
    forward = type(model).forward.__get__(model)
    batches = []

    def recording(*args, **kw):
        call = inspect.signature(forward).bind(*args, **kw).arguments
        batches.append((call["hidden_states"].shape[0],
                        torch.equal(call["encoder_hidden_states"], kwargs["negative_prompt_embeds"])))
        return forward(*args, **kw)
    recording.__wrapped__ = forward
    model.forward = recording
    try:
        _run(pipe, kwargs, pagkit.PAG(2.0, layers="blocks.1"))
    finally:
        del model.forward
    assert batches == [(2, False), (1, True)] * STEPS


def _hidream(guidance_scale):
    """HiDreamImagePipeline without its four text encoders: the T5, Llama (layers, batch, tokens, dim) and pooled
    embeddings are given. default_sample_size = 8 keeps its resize to a 64×64 image (8×8 latents, 4×4 tokens)."""
    from diffusers import HiDreamImagePipeline

    pipe = HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                tokenizer_3=None, text_encoder_4=None, tokenizer_4=None, transformer=models.hidream())
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(height=64, width=64, num_inference_steps=STEPS, output_type="latent", guidance_scale=guidance_scale)
    for prefix in ("", "negative_"):
        kwargs.update({f"{prefix}prompt_embeds_t5": torch.randn(1, 4, 8, generator=g),
                       f"{prefix}prompt_embeds_llama3": torch.randn(2, 1, 3, 4, generator=g),
                       f"{prefix}pooled_prompt_embeds": torch.randn(1, 8, generator=g)})
    return pipe, kwargs


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_hidream_pipeline_neutral_scale_is_plain_and_pag_equals_the_hand_reference(guidance_scale):
    """HiDream's model takes ``timesteps=`` (the backend's timestep_name) and batches CFG's halves on axis 1 of its
    Llama states; the pipeline negates the model's output, which the hand reference's Δ goes through linearly."""
    pipe, kwargs = _hidream(guidance_scale)
    layers = ["double_stream_blocks.0.block.attn1", "single_stream_blocks.1.block.attn1"]
    w = guidance_scale if guidance_scale > 1 else None
    plain = _run(pipe, kwargs)
    assert plain.shape == (1, 4, 8, 8)
    neutral = _run(pipe, kwargs, pagkit.PAG(0.0, layers=layers))
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers=layers))
    expected = _run(pipe, kwargs, hand=_HandGuided(pipe.transformer, layers, 2.0, STEPS, batched_cfg=w))
    assert torch.equal(neutral, plain)
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3


def test_hidream_guide_takes_the_models_own_argument_names():
    """``guide(model)`` is called with ``timesteps=`` and the native (layers, batch, tokens, dim) Llama states; an
    ``uncond`` that replaces only some inputs keeps the others (not re-transposed)."""
    model = models.hidream()
    x, t, native = models.hidream_inputs(batch=2)
    plain = model(hidden_states=x, timesteps=t, **native, return_dict=False)[0]
    neutral = pagkit.guide(model, [pagkit.PAG(0.0, layers="single_stream_blocks.0.block.attn1")])
    assert torch.equal(neutral(hidden_states=x, timesteps=t, **native, return_dict=False)[0], plain)
    negative = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(5))
    layer = "single_stream_blocks.0.block.attn1"
    guided = pagkit.guide(model, [pagkit.CFG(3.0), pagkit.PAG(2.0, layers=layer)],
                          uncond={"encoder_hidden_states_t5": negative})
    out = guided(hidden_states=x, timesteps=t, **native, progress=0.0).sample
    eps_u = model(hidden_states=x, timesteps=t, **{**native, "encoder_hidden_states_t5": negative},
                  return_dict=False)[0]
    backend = detect(model)
    with routed(model, [layer], backend) as router:
        router.info = backend.forward_info(model, x, native)
        router.plan = [Segment(0, 2, {layer: Identity()})]
        eps_p = model(hidden_states=x, timesteps=t, **native, return_dict=False)[0]
    torch.testing.assert_close(out, eps_u + 3.0 * (plain - eps_u) + 2.0 * (plain - eps_p), rtol=0, atol=1e-5)


class _HandZImage:
    """ZImagePipeline's transformer forward with PAG(scale, layers) by hand: the pipeline calls it with lists,
    [c; ∅] when it guides, and forms ε_c + w(ε_c − ε_u), so the conditional rows get ε_c + Δ/(1 + w)."""

    def __init__(self, model, layers, scale, steps, guidance_scale, start=0.0, samples=None):
        self.model, self.scale, self.steps, self.w, self.start = model, scale, steps, guidance_scale, start
        self.samples = samples  # given: a call of more rows than samples is a CFG batch (cfg_truncation)
        self.names = pagkit.resolve_layers(model, layers)
        self.forward = type(model).forward.__get__(model)
        self.step = 0

    def __call__(self, x, t, cap_feats, **kwargs):
        kwargs["return_dict"] = False
        eps = self.forward(x, t, cap_feats, **kwargs)[0]
        progress, self.step = self.step / self.steps, self.step + 1
        if progress < self.start:
            return (eps,)
        if self.samples is None:
            b, w = (len(x) // 2 if self.w > 0 else len(x)), self.w
        else:
            b, w = self.samples, (self.w if len(x) > self.samples else 0.0)
        backend = detect(self.model)
        with routed(self.model, self.names, backend) as router:
            router.info = backend.forward_info(self.model, torch.stack(x[:b]), {})
            router.plan = [Segment(0, b, {n: Identity() for n in self.names})]
            perturbed = self.forward(x[:b], t[:b], cap_feats[:b], **kwargs)[0]
        cond = [e + self.scale * (e - p) / (1.0 + w) for e, p in zip(eps[:b], perturbed)]
        return (cond + list(eps[b:]),)


def _zimage(guidance_scale, caption_positions=256):
    """ZImagePipeline without text encoder or VAE: 64×96 → 8×12 latents, 4×6 image tokens (padded to 32); the
    prompt has 5 caption tokens, the negative prompt 37 (padded to 32 and 64: the CFG batch's rows are masked)."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline(scheduler=_flux_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                          transformer=models.zimage(caption_positions=caption_positions))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(prompt_embeds=[torch.randn(5, 8, generator=g)], negative_prompt_embeds=[torch.randn(37, 8, generator=g)],
                  height=64, width=96, num_inference_steps=STEPS, output_type="latent", guidance_scale=guidance_scale)
    return pipe, kwargs


@pytest.mark.parametrize("guidance_scale", [3.0, 0.0])
def test_zimage_pipeline_neutral_scale_is_plain_and_pag_equals_the_hand_reference(guidance_scale):
    """ZImagePipeline calls its transformer with lists of latents and captions, ``t`` = (1000 − T)/1000, and CFG
    as [c; ∅] with ε_c + w(ε_c − ε_u) whenever w > 0."""
    pipe, kwargs = _zimage(guidance_scale)
    layers = ["noise_refiner.1.attention", "layers.1.attention"]
    plain = _run(pipe, kwargs)
    assert plain.shape == (1, 4, 8, 12)
    neutral = _run(pipe, kwargs, pagkit.PAG(0.0, layers=layers))
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers=layers))
    expected = _run(pipe, kwargs, hand=_HandZImage(pipe.transformer, layers, 2.0, STEPS, guidance_scale))
    assert torch.equal(neutral, plain)
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3


def test_zimage_cfg_truncation_steps_without_cfg_are_not_split_as_a_cfg_batch():
    """``cfg_truncation=0.5``: steps with (1000 − T)/1000 > 0.5 (here the last) run one plain batch of the 2
    samples, which must get ε + Δ, not be read as a [c; ∅] pair; the steps before guide with ε_c + Δ/(1 + w)."""
    pipe, kwargs = _zimage(3.0)
    kwargs.update(num_inference_steps=4, cfg_truncation=0.5, num_images_per_prompt=2)
    rows = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda x, *a, **k: rows.append(len(x)) or forward(x, *a, **k)
    _run(pipe, kwargs)
    del pipe.transformer.forward
    assert rows == [4, 4, 4, 2]  # the pipeline's own truncation: CFG on the first three steps only
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers="layers.1.attention"))
    expected = _run(pipe, kwargs, hand=_HandZImage(pipe.transformer, "layers.1.attention", 2.0, 4, 3.0, samples=2))
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)


def test_zimage_captions_over_512_tokens_keep_their_length():
    """A 600-token prompt (max_sequence_length=1024) beside a 37-token negative: pagkit pads both to 1024 rows to
    batch them and hands the model each caption at its own length, as the pipeline does."""
    pipe, kwargs = _zimage(3.0, caption_positions=1024)
    kwargs.update(prompt_embeds=[torch.randn(600, 8, generator=torch.Generator().manual_seed(5))],
                  max_sequence_length=1024)
    plain = _run(pipe, kwargs)
    assert torch.equal(_run(pipe, kwargs, pagkit.PAG(0.0, layers="layers.1.attention")), plain)
    attached = _run(pipe, kwargs, pagkit.PAG(2.0, layers="layers.1.attention"))
    expected = _run(pipe, kwargs, hand=_HandZImage(pipe.transformer, "layers.1.attention", 2.0, STEPS, 3.0))
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-4)


def test_zimage_cfg_normalization_is_refused_under_attach():
    pipe, kwargs = _zimage(3.0)
    with pytest.raises(ValueError, match="cfg_normalization"):
        _run(pipe, {**kwargs, "cfg_normalization": 1.0}, pagkit.PAG(2.0, layers="layers.1.attention"))
    assert "forward" not in vars(pipe.transformer)


def test_zimage_pipeline_intervals_follow_its_steps():
    """Z-Image's t = (1000 − T)/1000 maps back to the scheduler's T (Backend.scheduler_timestep): with start=0.5
    of 4 steps the first two steps are the plain pipeline's exactly."""
    pipe, kwargs = _zimage(3.0)
    kwargs["num_inference_steps"] = 4

    plain, attached, expected = [], [], []
    _run(pipe, kwargs, callback=latents_recorder(plain))
    _run(pipe, kwargs, pagkit.PAG(2.0, layers="layers.1.attention", start=0.5), callback=latents_recorder(attached))
    _run(pipe, kwargs, hand=_HandZImage(pipe.transformer, "layers.1.attention", 2.0, 4, 3.0, start=0.5),
         callback=latents_recorder(expected))
    for a, e in zip(attached, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-4)
    assert [torch.equal(a, p) for a, p in zip(attached, plain)] == [True, True, False, False]
