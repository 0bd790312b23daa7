"""NAG (normalized attention guidance): pagkit's batched negative branch against the official design, written
independently here, on a tiny SD-shaped and SDXL-shaped UNet (cross-attention), SD3 / SD3.5 (joint attention),
Flux.1 (double- and single-stream attention, the official Flux processors line by line) and Wan (video
cross-attention); neutral scale, schedule, one batched forward, restore, errors.

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
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

import models
import pagkit
import video_models
from pagkit.backends import detect
from pagkit.denoise import GuidedDenoiser

PHI, TAU, ALPHA = 3.0, 2.5, 0.5


def official_mix(zp, zn, phi, tau, alpha):
    """The official processors' arithmetic on (B, S, heads·d) (src/attention_flux_nag.py @ 69159ca, lines 135-142,
    with the L1 norm of the paper and of the later SDXL/SD3/Wan processors instead of that file's L2, as pagkit
    documents; ``FluxNAG`` below follows that file whole); nag_scale = φ + 1."""
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


class FluxNAG:
    """``NAGFluxAttnProcessor2_0.__call__`` (src/attention_flux_nag.py @ 69159ca, lines 28-176), line by line, on a
    diffusers ``FluxAttention``. Double-stream blocks: image rows B, text rows [c; c⁻]; the image q, k, v are tiled
    (lines 51-54) so both texts attend with the same image tokens, [text; image] per half (90-92), one rotary table
    for both (100-102: the negative text sits at the positive text's positions), the image outputs mixed after the
    SDPA and before ``to_out`` (129-149), each text keeps its own output (144, 151). Single-stream blocks: rows
    [[c; x]; [c⁻; x⁻]], each half attends on its own, the image tokens of both halves get the one mix (156-174),
    text tokens keep theirs. ``norm_p``: the file's norm is L2 (lines 136-137, 162-163); pagkit follows the paper
    and the later official processors with L1 (its documented choice), which ``norm_p=1`` tests."""

    def __init__(self, phi, tau, alpha, encoder_hidden_states_length, norm_p=1):
        self.nag_scale, self.nag_tau, self.nag_alpha = phi + 1, tau, alpha  # nag_scale = φ + 1
        self.encoder_hidden_states_length, self.p = encoder_hidden_states_length, norm_p

    def _guide(self, positive, negative):  # lines 135-142 (and 161-170)
        guidance = positive * self.nag_scale - negative * (self.nag_scale - 1)
        norm_positive = torch.norm(positive, p=self.p, dim=-1, keepdim=True).expand(*positive.shape)
        norm_guidance = torch.norm(guidance, p=self.p, dim=-1, keepdim=True).expand(*positive.shape)
        scale = norm_guidance / norm_positive
        guidance = guidance * torch.minimum(scale, scale.new_ones(1) * self.nag_tau) / scale
        return guidance * self.nag_alpha + positive * (1 - self.nag_alpha)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        batch_size = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if encoder_hidden_states is not None:
            assert len(hidden_states) == batch_size // 2
            query, key, value = query.tile(2, 1, 1), key.tile(2, 1, 1), value.tile(2, 1, 1)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq, ek, ev = (f(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                          for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = torch.cat([eq, query], 2), torch.cat([ek, key], 2), torch.cat([ev, value], 2)
            text_length = encoder_hidden_states.shape[1]
        else:
            text_length = self.encoder_hidden_states_length
        query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)
        half = batch_size // 2
        (query, query_negative), (key, key_negative), (value, value_negative) = \
            query.chunk(2), key.chunk(2), value.chunk(2)
        negative = F.scaled_dot_product_attention(query_negative, key_negative, value_negative)
        negative = negative.transpose(1, 2).reshape(half, -1, attn.heads * head_dim)
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(half, -1, attn.heads * head_dim)
        if encoder_hidden_states is not None:
            text, image = out[:, :text_length], out[:, text_length:]
            text_negative, image_negative = negative[:, :text_length], negative[:, text_length:]
            image = self._guide(image, image_negative)
            text = torch.cat((text, text_negative))
            return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)
        image = self._guide(out[:, text_length:], negative[:, text_length:])
        negative[:, text_length:] = image
        out[:, text_length:] = image
        return torch.cat((out, negative))


def _truncate_to_rows(module, args, kwargs):
    """The official pipeline's ``TruncAdaLayerNormZero`` / ``TruncAdaLayerNormContinuous`` (src/normalization.py
    @ 69159ca, swapped in by src/pipeline_flux_nag.py lines 361-367): the conditioning keeps the first rows, as many
    as the normalized input has (the B image rows take the positive rows' temb)."""
    rows = args[0].shape[0]
    cut = lambda v: v[:rows] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] > rows else v  # noqa: E731
    return (args[0], *map(cut, args[1:])), {k: cut(v) for k, v in kwargs.items()}


def _flux_reference(model, x, t, cond, negative, layers="all", phi=PHI, tau=TAU, alpha=0.25, norm_p=1):
    """``NAGFluxTransformer2DModel.forward`` (src/transformer_flux.py @ 69159ca, lines 71-178) on an unmodified
    diffusers model's modules, fed as ``NAGFluxPipeline`` feeds it (src/pipeline_flux_nag.py lines 283-285, 387-396):
    image rows B, text, pooled and timestep rows [c; c⁻] (temb 2B rows, cut to B by ``_truncate_to_rows`` where the
    input has B rows); ``FluxNAG`` on every attention (lines 38-46, 356-358); the image stream tiled to 2B before the
    single-stream blocks (lines 140-142; diffusers' single block now concatenates [text; image] itself) and the
    positive half read out (172-175).

    The NAG negative's pooled embedding here is the positive one: pagkit's documented choice (NAG's docstring).
    The official pipeline gives the negative prompt's own pooled embedding to the negative rows' text stream and, in
    the single-stream blocks, to their image tokens too.

    ``layers="double"``: NAG on the double-stream blocks only (an explicit choice of pagkit's; the official code has
    none): the single-stream blocks then run the positive rows alone, with their own processors."""
    b = x.shape[0]
    names = [f"transformer_blocks.{i}.attn" for i in range(len(model.transformer_blocks))]
    if layers == "all":
        names += [f"single_transformer_blocks.{i}.attn" for i in range(len(model.single_transformer_blocks))]
    text = cond["encoder_hidden_states"]
    processor = FluxNAG(phi, tau, alpha, text.shape[1], norm_p)

    def forward():
        hidden_states = model.x_embedder(x)
        timestep = torch.cat([t, t]).to(hidden_states.dtype) * 1000  # t.expand(prompt_embeds.shape[0])
        pooled = torch.cat([cond["pooled_projections"]] * 2)  # [pooled; nag_negative_pooled], the latter = positive
        temb = model.time_text_embed(timestep, pooled)
        encoder_hidden_states = model.context_embedder(torch.cat([text, negative]))
        image_rotary_emb = model.pos_embed(torch.cat((cond["txt_ids"], cond["img_ids"])))
        for block in model.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                         encoder_hidden_states=encoder_hidden_states, temb=temb,
                                                         image_rotary_emb=image_rotary_emb)
        if layers == "all":
            hidden_states = hidden_states.tile(2, 1, 1)
        else:
            encoder_hidden_states, temb = encoder_hidden_states[:b], temb[:b]
        for block in model.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                         encoder_hidden_states=encoder_hidden_states, temb=temb,
                                                         image_rotary_emb=image_rotary_emb)
        hidden_states = hidden_states.chunk(2)[0] if layers == "all" else hidden_states
        return model.proj_out(model.norm_out(hidden_states, temb))

    norms = [m for m in model.modules() if isinstance(m, (AdaLayerNormZero, AdaLayerNormContinuous))]
    hooks = [m.register_forward_pre_hook(_truncate_to_rows, with_kwargs=True) for m in norms]
    try:
        return _with_processors(model, names, processor, forward)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("batch, layers", [(1, None), (2, None), (2, "double")])
def test_flux_nag_equals_the_official_flux_processors(batch, layers):
    """Flux.1 (double- and single-stream attention) against the official Flux NAG code, with the family's default
    α = 0.25, pagkit's L1 norm (the official Flux file's L2 is a measurably different result) and the positive
    pooled embedding in the negative rows (see ``_flux_reference``), also when ``negative=None`` finds one in uncond."""
    model = models.flux()
    x, t, cond = models.flux_inputs(batch=batch)
    negative = torch.randn(batch, 5, 24, generator=torch.Generator().manual_seed(7))
    ours = GuidedDenoiser(model, [pagkit.NAG(PHI, layers=layers, negative={"encoder_hidden_states": negative})]
                          ).predict(x, t, cond, progress=0.0)
    reference = _flux_reference(model, x, t, cond, negative, layers=layers or "all")
    plain = model(hidden_states=x, timestep=t, **cond).sample
    assert (reference - plain).abs().max() > 1e-3  # not vacuous
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.modules())
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in model.attn_processors.values())
    if layers is None:  # the default layers: every joint and single-stream attention; the file's L2 differs
        bound = GuidedDenoiser(model, [pagkit.NAG(negative={"encoder_hidden_states": negative})]).methods[0]
        assert bound.sites == [f"transformer_blocks.{i}.attn" for i in range(2)] + \
            [f"single_transformer_blocks.{i}.attn" for i in range(2)] and bound.alpha == 0.25
        l2 = _flux_reference(model, x, t, cond, negative, norm_p=2)
        assert (l2 - reference).abs().max() > 1e-4
        # negative=None reads the text of uncond only: its pooled embedding does not reach the negative rows
        uncond = {**cond, "encoder_hidden_states": negative, "pooled_projections": torch.randn_like(
            cond["pooled_projections"])}
        from_uncond = GuidedDenoiser(model, [pagkit.NAG(PHI)]).predict(x, t, cond, uncond, progress=0.0)
        assert torch.equal(from_uncond, ours)


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
