"""NAG (normalized attention guidance): pagkit's batched negative branch against the official design, written
independently here, on a tiny SD-shaped and SDXL-shaped UNet (cross-attention), SD3 / SD3.5 (joint attention)
and Wan (video cross-attention); neutral scale, schedule, one batched forward, restore, errors.

The official design (ChenDarYen/Normalized-Attention-Guidance: nag/pipeline_sdxl_nag.py @ 8f2aa4f,
src/attention_flux_nag.py and src/pipeline_flux_nag.py @ 69159ca) runs the model on the positive rows only and
extends just the text with the negative prompt: at each NAG layer the same image queries attend to the positive
and to the negative text, and the image tokens continue with the mix. The references below do exactly that, with
test-written attention processors on an unmodified diffusers model (batch mismatch of image and text rows, as the
official code), so they share no code with pagkit's routing.
"""
import pytest
import torch
import torch.nn.functional as F

import models
import pagkit
import video_models
from pagkit.backends import detect
from pagkit.denoise import GuidedDenoiser

PHI, TAU, ALPHA = 3.0, 2.5, 0.5


def official_mix(zp, zn, phi, tau, alpha):
    """The official processors' arithmetic on (B, S, heads·d) (src/attention_flux_nag.py @ 69159ca, with the L1
    norm of the paper and of the later SDXL/SD3/Wan processors instead of that file's L2); nag_scale = φ + 1."""
    nag_scale = phi + 1
    guidance = zp * nag_scale - zn * (nag_scale - 1)
    norm_positive = torch.norm(zp, p=1, dim=-1, keepdim=True).expand(*zp.shape)
    norm_guidance = torch.norm(guidance, p=1, dim=-1, keepdim=True).expand(*zp.shape)
    scale = norm_guidance / norm_positive
    guidance = guidance * torch.minimum(scale, scale.new_ones(1) * tau) / scale
    return guidance * alpha + zp * (1 - alpha)


def _heads(t, heads):
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(t):
    return t.transpose(1, 2).flatten(2)


class CrossNAG:
    """UNet ``attn2`` (diffusers ``Attention``) or Wan ``attn2`` with the image rows B and the text rows [c; c⁻]."""

    def __init__(self, phi, tau, alpha, wan=False):
        self.args, self.wan = (phi, tau, alpha), wan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *_, **__):
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        if self.wan:
            q = attn.norm_q(q)

        def attend(ctx):
            k, v = attn.to_k(ctx), attn.to_v(ctx)
            if self.wan:
                k = attn.norm_k(k)
            return _merge(F.scaled_dot_product_attention(_heads(q, attn.heads), _heads(k, attn.heads),
                                                         _heads(v, attn.heads)))
        z = official_mix(attend(encoder_hidden_states[:b]), attend(encoder_hidden_states[b:]), *self.args)
        return attn.to_out[1](attn.to_out[0](z))


class JointNAG:
    """SD3 joint ``attn``: image rows B (shared by c and c⁻), text rows [c; c⁻]; SDPA over [image; text] for both,
    the image tokens' outputs mixed, each text keeps its own (the official joint processor's design)."""

    def __init__(self, phi, tau, alpha):
        self.args = (phi, tau, alpha)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        b, n = hidden_states.shape[:2]
        qkv = [_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v)]
        if attn.norm_q is not None:
            qkv[0], qkv[1] = attn.norm_q(qkv[0]), attn.norm_k(qkv[1])
        txt = [_heads(f(encoder_hidden_states), attn.heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        if attn.norm_added_q is not None:
            txt[0], txt[1] = attn.norm_added_q(txt[0]), attn.norm_added_k(txt[1])
        q, k, v = (torch.cat([t.repeat(2, 1, 1, 1), c], dim=2) for t, c in zip(qkv, txt))
        out = _merge(F.scaled_dot_product_attention(q, k, v))
        image, text = out[:, :n], out[:, n:]
        image = official_mix(image[:b], image[b:], *self.args)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, (text if attn.context_pre_only else attn.to_add_out(text))


def _with_processors(model, names, processor, run):
    originals = {n: model.get_submodule(n).processor for n in names}
    try:
        for n in names:
            model.get_submodule(n).set_processor(processor)
        return run()
    finally:
        for n, p in originals.items():
            model.get_submodule(n).set_processor(p)


def _unet_case(kind, batch=2):
    model = models.sd_unet() if kind == "sd" else models.sdxl_unet()
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(batch, 4, 16, 16, generator=g), torch.tensor(400)
    cond = {"encoder_hidden_states": torch.randn(batch, 7, 24, generator=g)}
    uncond = {"encoder_hidden_states": torch.randn(batch, 7, 24, generator=g)}
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(batch, 24, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
        cond["added_cond_kwargs"] = added
        uncond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 24, generator=g), "time_ids": added["time_ids"]}
    negative = torch.randn(batch, 7, 24, generator=g)
    return model, x, t, cond, uncond, negative


def _unet_reference(model, x, t, cond, negative, phi=PHI, tau=TAU, alpha=ALPHA, layers=None):
    names = layers or [s.name for s in detect(model).cross_sites(model)]
    inputs = {**cond, "encoder_hidden_states": torch.cat([cond["encoder_hidden_states"], negative])}
    return _with_processors(model, names, CrossNAG(phi, tau, alpha), lambda: model(x, t, **inputs).sample)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_unet_nag_equals_the_official_design(kind):
    model, x, t, cond, uncond, negative = _unet_case(kind)
    ours = GuidedDenoiser(model, [pagkit.NAG(PHI, tau=TAU, alpha=ALPHA, negative={"encoder_hidden_states": negative})]
                          ).predict(x, t, cond, progress=0.0)
    reference = _unet_reference(model, x, t, cond, negative)
    plain = model(x, t, **cond).sample
    assert (reference - plain).abs().max() > 1e-2  # not vacuous
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.modules())


def test_unet_nag_with_cfg_guides_the_conditional_half_and_defaults_to_the_uncond_text():
    """CFG + NAG: ε_u + w(ε_c^NAG − ε_u), as the official pipelines; negative=None reads uncond's text only (SDXL's
    pooled text_embeds stay the positive ones in the NAG rows, as the official pipeline's shared UNet pass)."""
    model, x, t, cond, uncond, _ = _unet_case("sdxl")
    w = 4.0
    ours = GuidedDenoiser(model, [pagkit.CFG(w), pagkit.NAG(PHI, alpha=ALPHA)]).predict(x, t, cond, uncond, progress=0.0)
    eps_u = model(x, t, **uncond).sample
    eps_c = _unet_reference(model, x, t, cond, uncond["encoder_hidden_states"])
    torch.testing.assert_close(ours, eps_u + w * (eps_c - eps_u), rtol=0, atol=5e-5)


def test_unet_nag_on_chosen_layers_only_mixes_there():
    """With one layer chosen, the other cross-attention layers of the conditional rows see the positive text only.
    (The negative rows then run on their own elsewhere; at the first cross-attention layer nothing before it
    differs, so their queries are the conditional ones, as in the official design.)"""
    model, x, t, cond, _, negative = _unet_case("sd")
    first = detect(model).cross_sites(model)[0].name
    ours = GuidedDenoiser(model, [pagkit.NAG(PHI, alpha=ALPHA, layers=first,
                                             negative={"encoder_hidden_states": negative})]).predict(x, t, cond)
    # the official design on one layer: elsewhere the cond rows see only the positive text
    names = [s.name for s in detect(model).cross_sites(model)]
    inputs = {**cond, "encoder_hidden_states": torch.cat([cond["encoder_hidden_states"], negative])}

    class Positive:  # the other cross-attention layers: the positive half of the text only
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
            return plain_processor(attn, hidden_states, encoder_hidden_states[:hidden_states.shape[0]], **kw)
    plain_processor = model.get_submodule(names[1]).processor
    reference = _with_processors(model, names[1:], Positive(), lambda: _with_processors(
        model, [first], CrossNAG(PHI, TAU, ALPHA), lambda: model(x, t, **inputs).sample))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def _sd3_reference(model, x, t, cond, negative, phi=PHI, tau=TAU, alpha=ALPHA):
    """Per sample (the official design's image rows broadcast the positive temb over [c; c⁻] text rows)."""
    names = [f"transformer_blocks.{i}.attn" for i in range(len(model.transformer_blocks))]

    def run():
        out = []
        for i in range(x.shape[0]):
            inputs = {k: v[i:i + 1] for k, v in cond.items()}
            inputs["encoder_hidden_states"] = torch.cat([inputs["encoder_hidden_states"], negative[i:i + 1]])
            out.append(model(hidden_states=x[i:i + 1], timestep=t[i:i + 1], **inputs).sample)
        return torch.cat(out)
    return _with_processors(model, names, JointNAG(phi, tau, alpha), run)


@pytest.mark.parametrize("transformer", [dict(), dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))],
                         ids=["sd3", "sd3.5"])
def test_sd3_joint_nag_equals_the_official_design(transformer):
    model = models.sd3(**transformer)
    x, t, cond = models.sd3_inputs(batch=2)
    negative = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(7))
    ours = GuidedDenoiser(model, [pagkit.NAG(PHI, alpha=ALPHA, negative={"encoder_hidden_states": negative})]
                          ).predict(x, t, cond, progress=0.0)
    reference = _sd3_reference(model, x, t, cond, negative)
    plain = model(hidden_states=x, timestep=t, **cond).sample
    assert (reference - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    # the default layers are the joint ones (SD3.5's attn2 self-attention is no NAG layer)
    bound = GuidedDenoiser(model, [pagkit.NAG(negative={"encoder_hidden_states": negative})]).methods[0]
    assert bound.sites == [f"transformer_blocks.{i}.attn" for i in range(3)] and bound.alpha == 0.125


def test_wan_cross_attention_nag_equals_the_official_design():
    model = video_models.wan()
    x, t, cond = video_models.wan_inputs(batch=1)
    negative = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(7))
    ours = GuidedDenoiser(model, [pagkit.NAG(PHI, negative={"encoder_hidden_states": negative})]).predict(x, t, cond)
    names = [s.name for s in detect(model).cross_sites(model)]
    assert names == ["blocks.0.attn2", "blocks.1.attn2"]
    inputs = {"encoder_hidden_states": torch.cat([cond["encoder_hidden_states"], negative])}
    reference = _with_processors(model, names, CrossNAG(PHI, TAU, 0.25, wan=True),
                                 lambda: model(hidden_states=x, timestep=t, **inputs).sample)
    assert (reference - model(hidden_states=x, timestep=t, **cond).sample).abs().max() > 1e-3
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["unet", "sd3", "flux"])
def test_neutral_scale_and_outside_the_interval_are_bit_identical(family):
    if family == "unet":
        model, x, t, cond, _, negative = _unet_case("sd")
    else:
        model = models.sd3() if family == "sd3" else models.flux()
        x, t, cond = (models.sd3_inputs if family == "sd3" else models.flux_inputs)(batch=2)
        negative = torch.randn_like(cond["encoder_hidden_states"])
    neg = {"encoder_hidden_states": negative}
    plain = GuidedDenoiser(model, []).predict(x, t, cond, progress=0.25)
    for term in (pagkit.NAG(0.0, negative=neg), pagkit.NAG(3.0, start=0.5, negative=neg),
                 pagkit.NAG(3.0, stop=0.25, negative=neg)):
        denoiser = GuidedDenoiser(model, [term])
        assert [b.name for b in denoiser.branches(0.25)[0]] == ["cond"]
        assert torch.equal(denoiser.predict(x, t, cond, progress=0.25), plain)
    guided = GuidedDenoiser(model, [pagkit.NAG(3.0, negative=neg)]).predict(x, t, cond, progress=0.25)
    assert (guided - plain).abs().max() > 1e-3


def test_sampling_with_neutral_nag_is_bit_identical_and_the_ramp_follows_the_schedule():
    model = models.sd_unet()
    g = torch.Generator().manual_seed(0)
    ehs, neg = torch.randn(2, 7, 24, generator=g), torch.randn(2, 7, 24, generator=g)

    def run(guidance):
        return pagkit.sample(model, models.ddim(), batch_size=2, num_inference_steps=3, guidance=guidance,
                             encoder_hidden_states=ehs, negative_encoder_hidden_states=neg,
                             generator=torch.Generator().manual_seed(1), progress_bar=False)
    assert torch.equal(run([pagkit.NAG(0.0)]), run([]))
    assert (run([pagkit.NAG(2.0)]) - run([])).abs().max() > 1e-3
    # scale_end: at progress p the scale is φ + (φ_end − φ)·p; the same step at that constant scale is equal
    model_, x, t, cond, _, negative = _unet_case("sd")
    ramp = pagkit.NAG(2.0, scale_end=0.0, negative={"encoder_hidden_states": negative})
    const = pagkit.NAG(1.5, negative={"encoder_hidden_states": negative})
    assert torch.equal(GuidedDenoiser(model_, [ramp]).predict(x, t, cond, progress=0.25),
                       GuidedDenoiser(model_, [const]).predict(x, t, cond, progress=0.25))


@pytest.mark.parametrize("cfg", [False, True])
def test_nag_joins_the_one_batched_forward(cfg):
    model, x, t, cond, uncond, negative = _unet_case("sd")
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        terms = [pagkit.CFG(3.0)] * cfg + [pagkit.NAG(2.0, negative={"encoder_hidden_states": negative[:1]})]
        GuidedDenoiser(model, terms).predict(x, t, cond, uncond, progress=0.5)
    finally:
        handle.remove()
    assert calls == [(3 if cfg else 2) * 2]  # [uncond,] cond, negative: one call


def test_model_is_restored_after_an_exception():
    model, x, t, cond, _, negative = _unet_case("sd")
    before = model(x, t, **cond).sample
    processors = dict(model.attn_processors)

    def explode(*a, **k):
        raise RuntimeError("boom")
    handle = model.conv_out.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        GuidedDenoiser(model, [pagkit.NAG(2.0, negative={"encoder_hidden_states": negative})]).predict(x, t, cond)
    handle.remove()
    assert all("forward" not in vars(m) for m in model.modules())
    assert model.attn_processors == processors
    assert torch.equal(model(x, t, **cond).sample, before)


def test_bad_arguments_fail_at_construction_or_binding_with_one_clear_error():
    for kwargs, match in [(dict(tau=0.5), "tau must be >= 1"), (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
                          (dict(alpha=-0.1), "alpha must be >= 0"), (dict(scale=float("nan")), "finite"),
                          (dict(negative="a dog"), "negative must be a non-empty dict"),
                          (dict(negative={}), "non-empty dict"), (dict(layers=3), "NAG layers must be"),
                          (dict(start=0.6, stop=0.5), "interval")]:
        with pytest.raises(ValueError, match=match):
            pagkit.NAG(**kwargs)
    unet = models.sd_unet()
    with pytest.raises(ValueError, match="NAG needs layers where the text enters"):
        GuidedDenoiser(models.unet2d(), [pagkit.NAG()])
    with pytest.raises(ValueError, match="selects none"):
        GuidedDenoiser(unet, [pagkit.NAG(layers="down.1")])  # a block without cross-attention
    with pytest.raises(ValueError, match="combines only with CFG.*PAG"):
        GuidedDenoiser(unet, [pagkit.CFG(3.0), pagkit.NAG(), pagkit.PAG(1.0)])
    with pytest.raises(ValueError, match="at most one NAG"):
        GuidedDenoiser(unet, [pagkit.NAG(), pagkit.NAG()])
    # the inputs are only known per step: one clear error before the model is called
    model, x, t, cond, _, negative = _unet_case("sd")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="from the caller's unconditional inputs"):
        GuidedDenoiser(model, [pagkit.NAG()]).predict(x, t, cond)
    with pytest.raises(ValueError, match="must match"):
        GuidedDenoiser(model, [pagkit.NAG(negative={"encoder_hidden_states": negative[:, :5]})]).predict(x, t, cond)
    assert calls == []


def test_cross_attention_layers_are_never_perturbable_sites():
    unet = models.sd_unet()
    assert not any(n.endswith("attn2") for n in pagkit.resolve_layers(unet, ["down", "mid", "up"]))
    assert all(s.kind == "cross" for s in detect(unet).cross_sites(unet))
    with pytest.raises(ValueError, match="cross-attention"):
        pagkit.resolve_layers(unet, "mid_block.attentions.0.transformer_blocks.0.attn2")


def test_attach_reads_the_pipelines_negative_prompt_under_its_cfg():
    from test_methods import _sd3_embeds, _sd3_pipe
    pipe = _sd3_pipe(num_layers=3)
    embeds = _sd3_embeds()
    kwargs = dict(**embeds, height=32, width=32, num_inference_steps=3, guidance_scale=4.0, output_type="latent")

    def run(*terms):
        if not terms:
            return pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
        with pagkit.attach(pipe, *terms):
            return pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    plain = run()
    assert torch.equal(run(pagkit.NAG(0.0)), plain)
    guided = run(pagkit.NAG(2.0))
    assert (guided - plain).abs().max() > 1e-3
    explicit = run(pagkit.NAG(2.0, negative={"encoder_hidden_states": embeds["negative_prompt_embeds"]}))
    assert torch.equal(guided, explicit)
    assert all("forward" not in vars(m) for m in pipe.transformer.modules())
