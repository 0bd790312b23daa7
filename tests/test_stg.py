"""STG (spatiotemporal skip guidance) on the tiny video models: neutral scale and schedule, STG-A = PAG on the same
sites, STG-R = a reference forward with the blocks' forwards replaced by hand, the official std rescaling, kind
selection (AnimateDiff spatial vs temporal), one model call per step, restore after an exception, clear errors.

The official code (junhahyung/STGuidance @ df04da05d5631e577fedb7e58eff6ddb4ffa4984, Mochi/pipeline_stg_mochi.py,
the same lines in CogVideoX/ and LTXVideo/) guides and rescales as

    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond) \\
        + self._stg_scale * (noise_pred_text - noise_pred_perturb)
    if do_rescaling:
        rescaling_scale = 0.7
        factor = noise_pred_text.std() / noise_pred.std()
        factor = rescaling_scale * factor + (1 - rescaling_scale)
        noise_pred = noise_pred * factor

and its STG-R ``forward_with_stg`` gives the perturbed rows the block's inputs back; ``_official`` below is those
lines, verbatim.
"""
import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import pagkit
import video_models as V
from pagkit.backends import detect
from pagkit.denoise import GuidedDenoiser
from pagkit.methods import METHODS
from pagkit.methods.stg import DEFAULT_BLOCKS

W = 3.0  # CFG scale of the tests

# family → builder, inputs, and the blocks a residual test skips (by name, as the reference does by hand)
FAMILIES = {
    "wan": (V.wan, V.wan_inputs, ["blocks.1"]),
    "ltx": (V.ltx, V.ltx_inputs, ["transformer_blocks.1"]),
    "cogvideox": (V.cogvideox, None, ["transformer_blocks.0"]),
    "mochi": (V.mochi, V.mochi_inputs, ["transformer_blocks.0"]),
    "hunyuan_video": (V.hunyuan_video, V.hunyuan_video_inputs, ["transformer_blocks.1", "single_transformer_blocks.0"]),
    "animatediff": (V.animatediff, V.animatediff_inputs, ["mid_block.motion_modules.0", "down_blocks.0.attentions.0"]),
}
TWO_STREAMS = ("CogVideoXBlock", "MochiTransformerBlock", "HunyuanVideoTransformerBlock",
               "HunyuanVideoSingleTransformerBlock")


def _setup(family, batch=2):
    """The model, x, t, and per-sample cond / uncond inputs (uncond: other text embeddings)."""
    build, inputs, _ = FAMILIES[family]
    model = build()
    x, t, cond = V.cogvideox_inputs(batch=batch, model=model) if family == "cogvideox" else inputs(batch=batch)
    backend = detect(model)
    g = torch.Generator().manual_seed(7)
    uncond = {**cond, "encoder_hidden_states": torch.randn(cond["encoder_hidden_states"].shape, generator=g)}
    return model, x, t, backend.per_sample_inputs(model, x, cond), backend.per_sample_inputs(model, x, uncond)


def _call(model, x, t, kwargs):
    return detect(model).call(model, x, t, kwargs)


def _predict(model, terms, x, t, cond, uncond, progress=0.5, **kw):
    return GuidedDenoiser(model, terms, **kw).predict(x, t, cond, uncond, progress=progress)


def _identity_forward(module):
    """A skipped block written by hand: the block's own output structure, holding its inputs."""
    name = type(module).__name__
    if name in TWO_STREAMS:
        return lambda hidden_states, encoder_hidden_states, *a, **k: (hidden_states, encoder_hidden_states)
    if name == "Transformer2DModel":
        return lambda hidden_states, *a, return_dict=True, **k: \
            Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)
    return lambda hidden_states, *a, **k: hidden_states  # Wan, LTX blocks and AnimateDiff motion modules


def _skipped_forward(model, blocks, x, t, kwargs):
    """ε of ``model`` with ``blocks`` returning their inputs, by replacing their forwards by hand."""
    for name in blocks:
        module = model.get_submodule(name)
        module.forward = _identity_forward(module)
    try:
        return _call(model, x, t, kwargs)
    finally:
        for name in blocks:
            del model.get_submodule(name).forward


def _official(noise_pred_uncond, noise_pred_text, noise_pred_perturb, guidance_scale, stg_scale, do_rescaling):
    """The official Mochi/CogVideoX/LTX guidance and rescaling lines (see the module docstring), verbatim."""
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond) \
        + stg_scale * (noise_pred_text - noise_pred_perturb)
    if do_rescaling:
        rescaling_scale = 0.7
        factor = noise_pred_text.std() / noise_pred.std()
        factor = rescaling_scale * factor + (1 - rescaling_scale)
        noise_pred = noise_pred * factor
    return noise_pred


def _restored(model):
    return all("forward" not in vars(m) for m in model.modules())


def test_stg_is_registered_exported_and_keeps_the_official_defaults():
    assert METHODS["stg"] is pagkit.STG is pagkit.guidance.STG
    assert pagkit.STG.__module__ == "pagkit.methods.stg" and "Hyung" in pagkit.STG.__doc__
    term = pagkit.STG()
    assert (term.scale, term.layers, term.mode, term.kind, term.rescale) == (1.0, None, "residual", None, 0.0)
    assert DEFAULT_BLOCKS == {"mochi": [34], "cogvideox": [11], "hunyuan_video": [2], "ltx": [19], "wan": [2]}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["residual", "attention"])
def test_neutral_scale_and_outside_the_interval_are_bit_identical(family, mode):
    model, x, t, cond, uncond = _setup(family)
    layers = FAMILIES[family][2]
    plain = _predict(model, [pagkit.CFG(W)], x, t, cond, uncond)
    for term in (pagkit.STG(0.0, layers=layers, mode=mode, rescale=0.7),
                 pagkit.STG(2.0, layers=layers, mode=mode, rescale=0.7, start=0.6)):
        assert torch.equal(_predict(model, [pagkit.CFG(W), term], x, t, cond, uncond), plain)
        assert [b.name for b in GuidedDenoiser(model, [term]).branches(0.5)[0]] == ["cond"]
    assert _restored(model)


@pytest.mark.parametrize("family", ["wan", "cogvideox", "mochi", "hunyuan_video", "ltx"])
def test_stg_a_equals_pag_on_the_same_sites(family):
    model, x, t, cond, uncond = _setup(family)
    term = pagkit.STG(2.0, layers=[0, 1], mode="attention")
    sites = list(GuidedDenoiser(model, [term]).methods[0].patches)
    blocks = detect(model).skip_blocks(model)[:2]
    assert sites == [s for s in pagkit.resolve_layers(model, "*") if s.rsplit(".", 1)[0] in blocks]
    ours = _predict(model, [pagkit.CFG(W), term], x, t, cond, uncond)
    pag = _predict(model, [pagkit.CFG(W), pagkit.PAG(2.0, layers=sites)], x, t, cond, uncond)
    assert torch.equal(ours, pag)
    assert not torch.allclose(ours, _predict(model, [pagkit.CFG(W)], x, t, cond, uncond), atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stg_r_equals_a_reference_with_the_blocks_forwards_replaced_by_hand(family):
    model, x, t, cond, uncond = _setup(family)
    blocks = FAMILIES[family][2]
    term = pagkit.STG(1.5, layers=blocks, mode="residual")
    assert sorted(GuidedDenoiser(model, [term]).methods[0].patches) == sorted(blocks)
    ours = _predict(model, [pagkit.CFG(W), term], x, t, cond, uncond)
    eps_u, eps_c = _call(model, x, t, uncond), _call(model, x, t, cond)
    eps_ptb = _skipped_forward(model, blocks, x, t, cond)
    assert not torch.allclose(eps_ptb, eps_c, atol=1e-3)  # the skip changes the prediction: not vacuous
    reference = _official(eps_u, eps_c, eps_ptb, W, 1.5, do_rescaling=False)
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5)
    assert _restored(model)


def test_stg_r_by_official_block_index_and_without_cfg():
    """Indices are the official ``stg_applied_layers_idx``; without CFG ε̃ = ε_c + s(ε_c − ε_ptb) (the official
    HunyuanVideo pipeline, guidance-distilled)."""
    model, x, t, cond, _ = _setup("hunyuan_video")
    ours = _predict(model, [pagkit.STG(1.0, layers=[1])], x, t, cond, None)
    eps_c = _call(model, x, t, cond)
    eps_ptb = _skipped_forward(model, ["transformer_blocks.1"], x, t, cond)
    torch.testing.assert_close(ours, eps_c + 1.0 * (eps_c - eps_ptb), rtol=0, atol=2e-5)


@pytest.mark.parametrize("mode", ["residual", "attention"])
def test_rescaling_equals_the_official_formula(mode):
    model, x, t, cond, uncond = _setup("mochi", batch=1)
    blocks = ["transformer_blocks.1"]
    term = pagkit.STG(2.0, layers=blocks, mode=mode, rescale=0.7)
    ours = _predict(model, [pagkit.CFG(W), term], x, t, cond, uncond)
    eps_u, eps_c = _call(model, x, t, uncond), _call(model, x, t, cond)
    eps_ptb = GuidedDenoiser(model, [pagkit.STG(1.0, layers=blocks, mode=mode)]).predict(x, t, cond) * -1 + 2 * eps_c
    # (ε_c + 1·(ε_c − ε_ptb) = 2ε_c − ε_ptb, so this is ε_ptb as STG computes it; for STG-R it is the hand reference)
    if mode == "residual":
        torch.testing.assert_close(eps_ptb, _skipped_forward(model, blocks, x, t, cond), rtol=0, atol=2e-5)
    reference = _official(eps_u, eps_c, eps_ptb, W, 2.0, do_rescaling=True)
    unrescaled = _official(eps_u, eps_c, eps_ptb, W, 2.0, do_rescaling=False)
    assert (reference - unrescaled).abs().max() > 1e-3
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5)


def test_rescaling_is_per_sample_and_works_inside_a_pipeline_cfg():
    model, x, t, cond, uncond = _setup("wan", batch=2)
    term = pagkit.STG(2.0, layers=[0], rescale=0.7)
    ours = _predict(model, [pagkit.CFG(W), term], x, t, cond, uncond)
    for i in range(2):  # each sample as the official code rescales a batch of one
        rows = {k: v[i:i + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v for k, v in cond.items()}
        rows_u = {k: v[i:i + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v for k, v in uncond.items()}
        eps_u, eps_c = _call(model, x[i:i + 1], t[i:i + 1], rows_u), _call(model, x[i:i + 1], t[i:i + 1], rows)
        eps_ptb = _skipped_forward(model, ["blocks.0"], x[i:i + 1], t[i:i + 1], rows)
        torch.testing.assert_close(ours[i:i + 1], _official(eps_u, eps_c, eps_ptb, W, 2.0, True), rtol=0, atol=2e-5)
    # a pipeline that does CFG itself: the ε_c' returned makes its ε_u + w(ε_c' − ε_u) the rescaled ε̃
    eps_u, eps_c_prime = GuidedDenoiser(model, [term]).predict(x, t, cond, uncond, progress=0.5,
                                                                 external_cfg=W).chunk(2)
    torch.testing.assert_close(eps_u + W * (eps_c_prime - eps_u), ours, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="separate-call CFG"):  # ε_u from a call of its own: it cannot rescale
        GuidedDenoiser(model, [term]).predict(x, t, cond, None, progress=0.5, external_cfg=W)
    with pytest.raises(ValueError, match="rescaled once"):
        GuidedDenoiser(model, [term, pagkit.STG(1.0, layers=[1], rescale=0.5)])


def test_schedule_ramps_the_scale():
    model, x, t, cond, uncond = _setup("ltx")
    ramp = pagkit.STG(2.0, layers=[0], start=0.0, stop=1.0, scale_end=0.0)
    half = pagkit.STG(1.0, layers=[0])
    torch.testing.assert_close(_predict(model, [pagkit.CFG(W), ramp], x, t, cond, uncond, progress=0.5),
                               _predict(model, [pagkit.CFG(W), half], x, t, cond, uncond), rtol=0, atol=1e-6)
    assert [ramp.scale_at(p) for p in (0.0, 0.25, 1.0)] == [2.0, 1.5, 0.0]


def test_kind_selects_exactly_the_sites_of_that_kind():
    model = V.animatediff()
    kinds = {s.name: s.kind for s in detect(model).sites(model)}

    def chosen(**kw):
        return list(GuidedDenoiser(model, [pagkit.STG(1.0, **kw)]).methods[0].patches)
    for kind in ("spatial", "temporal"):
        assert chosen(layers="*", mode="attention", kind=kind) == [n for n, k in kinds.items() if k == kind]
    assert chosen(layers="mid", mode="attention", kind="temporal") == [
        "mid_block.motion_modules.0.transformer_blocks.0.attn1", "mid_block.motion_modules.0.transformer_blocks.0.attn2"]
    assert chosen(layers="mid", mode="attention", kind="spatial") == [
        "mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert chosen(layers="mid", mode="residual", kind="temporal") == ["mid_block.motion_modules.0"]
    assert chosen(layers=["mid", "up.1"], mode="residual", kind="spatial") == [
        "mid_block.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    wan = V.wan()
    assert list(GuidedDenoiser(wan, [pagkit.STG(1.0, layers="*", mode="attention", kind="spatiotemporal")])
                .methods[0].patches) == ["blocks.0.attn1", "blocks.1.attn1"]


def test_animatediff_spatial_and_temporal_stg_a_as_two_terms():
    """The official SVD example: spatial and temporal STG-A as two scales; here two terms, one batched forward."""
    model, x, t, cond, uncond = _setup("animatediff")
    spatial = pagkit.STG(2.0, layers="up.1", mode="attention", kind="spatial")
    temporal = pagkit.STG(0.5, layers="up.1", mode="attention", kind="temporal")
    both = _predict(model, [pagkit.CFG(W), spatial, temporal], x, t, cond, uncond)
    names = {k: list(GuidedDenoiser(model, [s]).methods[0].patches) for k, s in (("s", spatial), ("t", temporal))}
    assert names["s"] == ["up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                          "up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
    assert len(names["t"]) == 4 and all(".motion_modules." in n for n in names["t"])
    pag = _predict(model, [pagkit.CFG(W), pagkit.PAG(2.0, layers=names["s"]), pagkit.PAG(0.5, layers=names["t"])],
                   x, t, cond, uncond)
    assert torch.equal(both, pag)
    alone = {k: _predict(model, [pagkit.CFG(W), s], x, t, cond, uncond) for k, s in (("s", spatial), ("t", temporal))}
    plain = _predict(model, [pagkit.CFG(W)], x, t, cond, uncond)
    assert not torch.allclose(alone["s"], alone["t"], atol=1e-4)
    torch.testing.assert_close(both, alone["s"] + alone["t"] - plain, rtol=0, atol=2e-5)


@pytest.mark.parametrize("mode", ["residual", "attention"])
def test_one_model_call_per_step(mode):
    model, x, t, cond, uncond = _setup("cogvideox")
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append((a or [k.get("hidden_states")])[0].shape[0]),
                                             with_kwargs=True)
    try:
        _predict(model, [pagkit.CFG(W), pagkit.STG(1.0, layers=[0], mode=mode, rescale=0.7)], x, t, cond, uncond)
    finally:
        handle.remove()
    assert calls == [6]  # uncond, cond, perturbed: one call


@pytest.mark.parametrize("mode", ["residual", "attention"])
def test_restored_after_an_exception(mode):
    model, x, t, cond, uncond = _setup("mochi")
    before = _call(model, x, t, cond)
    processors = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}

    def explode(*a, **k):
        raise RuntimeError("boom")
    handle = model.proj_out.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _predict(model, [pagkit.CFG(W), pagkit.STG(1.0, layers=[0, 1], mode=mode)], x, t, cond, uncond)
    finally:
        handle.remove()
    assert _restored(model)
    assert processors == {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    assert torch.equal(_call(model, x, t, cond), before)


def test_bad_arguments_give_one_clear_error_before_sampling():
    with pytest.raises(ValueError, match="kind must be None or one of 'spatial', 'temporal', 'spatiotemporal'"):
        pagkit.STG(kind="3d")
    with pytest.raises(ValueError, match="mode must be one of 'attention', 'residual'"):
        pagkit.STG(mode="STG-A")
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rescale"):
            pagkit.STG(rescale=bad)
    for bad in ([], [-1], [True], [1.5], [""]):
        with pytest.raises(ValueError, match="STG"):
            pagkit.STG(layers=bad)
    wan, anim = V.wan(), V.animatediff()
    for mode in ("residual", "attention"):  # Wan has 3-D attention only: the error names the kinds it has
        with pytest.raises(ValueError, match="WanTransformer3DModel has no temporal attention sites; its sites are "
                                             "of kind: spatiotemporal"):
            GuidedDenoiser(wan, [pagkit.STG(1.0, layers=[0], mode=mode, kind="temporal")])
    with pytest.raises(ValueError, match="no spatiotemporal attention sites; its sites are of kind: spatial, temporal"):
        GuidedDenoiser(anim, [pagkit.STG(1.0, layers="mid", mode="attention", kind="spatiotemporal")])
    with pytest.raises(ValueError, match="holds no temporal attention site"):
        GuidedDenoiser(anim, [pagkit.STG(1.0, layers=["mid_block.attentions.0"], kind="temporal")])
    with pytest.raises(ValueError, match="no default layers.*pass layers="):
        GuidedDenoiser(anim, [pagkit.STG(1.0)])
    with pytest.raises(ValueError, match="out of range.*2 blocks"):  # the official Wan default, block 2, on 2 blocks
        GuidedDenoiser(wan, [pagkit.STG(1.0)])
    with pytest.raises(ValueError, match="out of range"):
        GuidedDenoiser(wan, [pagkit.STG(1.0, layers=[5], mode="attention")])
    # the same kind check serves every method's layer selection
    with pytest.raises(ValueError, match="unknown site kind 'bogus'; valid kinds: self, joint, single, spatial"):
        pagkit.resolve_layers(wan, "*", kind="bogus")
    with pytest.raises(ValueError, match="its sites are of kind: spatiotemporal"):
        pagkit.resolve_layers(wan, "blocks.0", kind="spatial")


@pytest.mark.parametrize("name", ["cogvideox", "ltx"])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_stg_in_a_video_pipeline_equals_the_official_guidance(name, rescale):
    """``pagkit.attach`` in CogVideoXPipeline / LTXPipeline (CFG batched as [∅; c]) against a hand-written
    transformer forward doing what the official STG pipelines do each step: ε_u, ε_c and ε_ptb (the block's forward
    replaced by hand), then ``_official``; it returns that ε̃ for both halves, so the pipeline's own CFG keeps it."""
    from test_pipelines_video import _setup as pipeline_setup
    pipe, kwargs, _, _ = pipeline_setup(name, True)
    model, w, blocks = pipe.transformer, kwargs["guidance_scale"], ["transformer_blocks.1"]

    def plain_forward(**kw):
        return type(model).forward(model, **kw)

    def hand(**kw):
        kw.pop("return_dict", None)
        rows = kw["hidden_states"].shape[0]
        eps_u, eps_c = plain_forward(**kw, return_dict=False)[0].chunk(2)
        cond = {k: v[rows // 2:] if torch.is_tensor(v) and v.ndim and v.shape[0] == rows else v for k, v in kw.items()}
        for block in blocks:
            model.get_submodule(block).forward = _identity_forward(model.get_submodule(block))
        try:
            eps_ptb = plain_forward(**cond, return_dict=False)[0]
        finally:
            for block in blocks:
                del model.get_submodule(block).forward
        guided = _official(eps_u, eps_c, eps_ptb, w, 2.0, do_rescaling=rescale > 0)
        return (torch.cat([guided, guided]),)

    def run(*guidance):
        if not guidance:
            return pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames
        with pagkit.attach(pipe, *guidance):
            return pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames
    model.forward = hand
    try:
        expected = run()
    finally:
        del model.forward
    ours = run(pagkit.STG(2.0, layers=blocks, rescale=rescale))
    plain = run()
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    assert _restored(model)
