"""Methods own their behaviour (pagkit.methods), and SLG: block skip as a routing patch, diffusers parity on SD3,
UNet blocks, and the guarantees every term keeps (neutral = bit-identical, schedule, one batched forward,
restored after an exception)."""
import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import models
import pagkit
from pagkit.denoise import GuidedDenoiser
from pagkit.methods import METHODS
from pagkit.methods.slg import resolve_blocks
from pagkit.backends import detect
from pagkit.routing import SKIP, Segment, routed

NULL = 10


def _sample(model, guidance, steps=4, **kw):
    return pagkit.sample(model, models.ddim(), batch_size=2, num_inference_steps=steps, guidance=guidance,
                         generator=torch.Generator().manual_seed(0), progress_bar=False, **kw)


def test_every_method_lives_in_its_own_module_and_is_exported():
    assert set(METHODS) == {"cfg", "pag", "seg", "sag", "slg", "stg", "tpg", "nag", "autoguidance"}
    for name, cls in METHODS.items():
        assert cls.__module__ == f"pagkit.methods.{name}"
        assert getattr(pagkit, cls.__name__) is cls
        assert cls.__doc__ and len(cls.__doc__) > 40
    from pagkit.guidance import CFG, PAG, SAG, SEG, SLG, STG, TPG  # the old import path stays
    assert (CFG, PAG, SEG, SAG, SLG, STG, TPG) == (pagkit.CFG, pagkit.PAG, pagkit.SEG, pagkit.SAG, pagkit.SLG,
                                                  pagkit.STG, pagkit.TPG)


def test_old_terms_keep_their_arguments_and_defaults():
    fields = {cls.__name__: {f.name: f.default for f in dataclasses.fields(cls)} for cls in METHODS.values()}
    common = {"start": 0.0, "stop": 1.0, "scale_end": None, "rule": None}
    assert fields["CFG"] == {"scale": 7.5, **common}
    cheap = {"cache": 1, "cache_mode": "reuse", "fold": False}  # the contrast terms' cheaper variants (test_cost.py)
    assert fields["PAG"] == {"scale": 3.0, **common, **cheap, "layers": "mid", "perturbation": "identity", "mask_prob": 0.5,
                             "noise_std": 1.0, "seed": 0, "heads": None, "strength": 1.0}
    assert fields["SEG"] == {"scale": 3.0, **common, **cheap, "sigma": float("inf"), "layers": "mid", "per_frame": False}
    assert fields["SAG"] == {"scale": 0.75, **common, "layer": "mid", "blur_sigma": 1.0, "kernel_size": 9}
    assert fields["SLG"] == {"scale": 2.8, "start": 0.01, "stop": 0.2, "scale_end": None, "rule": None, **cheap,
                             "layers": (7, 8, 9)}
    assert fields["TPG"] == {"scale": 3.0, **common, **cheap, "layers": tuple(range(6, 24)), "seed": 0}


def test_slg_interval_is_open_at_both_ends_as_diffusers():
    term = pagkit.SLG(2.0, layers=[0], start=0.25, stop=0.75, scale_end=0.0)
    assert [term.scale_at(p) for p in (0.0, 0.25, 0.26, 0.5, 0.74, 0.75)] == \
        pytest.approx([0, 0, 2 * (1 - 0.01 / 0.5), 1, 2 * 0.01 / 0.5, 0], abs=1e-9)
    # diffusers: i > N*start and i < N*stop, step i of N
    for n in (10, 20, 28, 50):
        default = pagkit.SLG()
        assert [i for i in range(n) if default.active(i / n)] == [i for i in range(n) if n * 0.01 < i < n * 0.2]
    for bad in ([], [-1], [True], [1.5], [""]):
        with pytest.raises(ValueError):
            pagkit.SLG(layers=bad)


def test_slg_block_selection_by_index_name_glob_and_layer_alias():
    sd3, unet, cond = models.sd3(num_layers=5), models.unet2d(), models.sd_unet()
    b = detect(sd3)
    assert resolve_blocks(sd3, b, [3, 1]) == ["transformer_blocks.1", "transformer_blocks.3"]
    assert resolve_blocks(sd3, b, "blocks.2") == ["transformer_blocks.2"]
    assert resolve_blocks(sd3, b, "transformer_blocks.[34]") == ["transformer_blocks.3", "transformer_blocks.4"]
    assert resolve_blocks(unet, detect(unet), "mid") == ["mid_block.attentions.0"]
    assert resolve_blocks(cond, detect(cond), ["down.0", "up"]) == [
        "down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    with pytest.raises(ValueError, match="out of range.*5 blocks"):
        resolve_blocks(sd3, b, [7, 8, 9])
    with pytest.raises(ValueError, match="unknown layer"):
        resolve_blocks(unet, detect(unet), "middle")
    with pytest.raises(ValueError, match="out of range"):  # at construction of the denoiser, before any work
        GuidedDenoiser(sd3, [pagkit.SLG()])


def _identity_block(module):
    """A hand-made skipped block, independent of routing: returns its input as the block's own output type."""
    def forward(hidden_states, *args, return_dict=True, **kwargs):
        if isinstance(module, pagkit.backends.unet.Attention):
            return hidden_states
        return (hidden_states,) if not return_dict else Transformer2DModelOutput(sample=hidden_states)
    return forward


@pytest.mark.parametrize("builder,inputs,blocks", [
    (lambda: models.unet2d(num_class_embeds=11), "class", "down.1"),
    (models.sd_unet, "text", "mid"),
])
def test_slg_on_unets_batched_equals_separate_forwards(builder, inputs, blocks):
    model = builder()
    if inputs == "class":
        x = torch.randn(2, 1, 16, 16)
        cond, uncond = {"class_labels": torch.tensor([3, 4])}, {"class_labels": torch.tensor([NULL, NULL])}
    else:
        x = torch.randn(2, 4, 16, 16)
        cond, uncond = {"encoder_hidden_states": torch.randn(2, 7, 24)}, {"encoder_hidden_states": torch.randn(2, 7, 24)}
    t = torch.tensor(400)
    # PAG and SLG on the same layers: on UNet2DModel the site and the block are one module
    terms = [pagkit.CFG(4.0), pagkit.PAG(2.0, layers=blocks), pagkit.SLG(1.5, layers=blocks, start=0.0, stop=1.0)]
    batched = GuidedDenoiser(model, terms).predict(x, t, cond, uncond, progress=0.5)

    eps_u, eps_c = model(x, t, **uncond).sample, model(x, t, **cond).sample
    names = pagkit.resolve_layers(model, blocks)
    with routed(model, names) as router:
        router.input_hw = tuple(x.shape[-2:])
        router.plan = [Segment(0, 2, {n: terms[1].make_perturbation() for n in names})]
        eps_pag = model(x, t, **cond).sample
    skipped = resolve_blocks(model, detect(model), blocks)
    for name in skipped:
        module = model.get_submodule(name)
        module.forward = _identity_block(module)
    try:
        eps_skip = model(x, t, **cond).sample
    finally:
        for name in skipped:
            del model.get_submodule(name).forward
    assert not torch.allclose(eps_skip, eps_c, atol=1e-3)
    separate = eps_u + 4.0 * (eps_c - eps_u) + 2.0 * (eps_c - eps_pag) + 1.5 * (eps_c - eps_skip)
    torch.testing.assert_close(batched, separate, rtol=0, atol=5e-5)


@pytest.mark.parametrize("term", [pagkit.SLG(0.0, layers="mid", start=0.0, stop=1.0),
                                  pagkit.SLG(3.0, layers="down.1", start=0.9, stop=1.0),
                                  pagkit.SLG(3.0, layers="down.1", start=0.0, stop=0.2)])  # steps 0.25.. of 4: none
def test_slg_neutral_scale_or_outside_interval_is_bit_identical(term):
    model = models.unet2d(num_class_embeds=11)
    labels = dict(class_labels=torch.tensor([1, 2]), null_class_label=NULL)
    assert torch.equal(_sample(model, [pagkit.CFG(2.0), term], **labels), _sample(model, [pagkit.CFG(2.0)], **labels))
    denoiser = GuidedDenoiser(model, [term])
    assert all([b.name for b in denoiser.branches(i / 4)[0]] == ["cond"] for i in range(4))


def test_slg_joins_the_one_batched_forward():
    model = models.unet2d()
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        GuidedDenoiser(model, [pagkit.PAG(1.0, layers="mid"), pagkit.SLG(1.0, layers="mid", start=0.0, stop=1.0)]).predict(
            torch.randn(2, 1, 16, 16), torch.tensor(500), progress=0.5)
    finally:
        handle.remove()
    assert calls == [6]  # cond, pag, slg: one call


def test_block_skip_is_restored_after_an_exception_and_leaves_other_rows_alone():
    model = models.sd3(num_layers=3)
    x, t, kw = models.sd3_inputs(batch=2)
    before = model(hidden_states=x, timestep=t, **kw).sample
    with pytest.raises(RuntimeError, match="boom"):
        with routed(model, ["transformer_blocks.1"]) as router:
            router.plan = [Segment(1, 2, {"transformer_blocks.1": SKIP})]
            out = model(hidden_states=x, timestep=t, **kw).sample
            raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in model.modules())
    assert torch.equal(model(hidden_states=x, timestep=t, **kw).sample, before)
    torch.testing.assert_close(out[:1], before[:1], rtol=0, atol=0)
    assert not torch.allclose(out[1:], before[1:], atol=1e-3)
    with pytest.raises(RuntimeError, match="boom"):  # and through the denoiser
        def explode(*a, **k):
            raise RuntimeError("boom")
        model.proj_out.register_forward_hook(explode)
        GuidedDenoiser(model, [pagkit.SLG(2.0, layers=[1], start=0.0, stop=1.0)]).predict(x, t, kw, progress=0.5)
    assert all("forward" not in vars(m) for m in model.modules())


def _sd3_pipe(**transformer):
    pipe = StableDiffusion3Pipeline(transformer=models.sd3(**transformer), vae=models.vae(shift_factor=0.1),
                                    scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd3_embeds():
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 5, 24, generator=g), negative_prompt_embeds=torch.randn(1, 5, 24, generator=g),
                pooled_prompt_embeds=torch.randn(1, 12, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, 12, generator=g))


@pytest.mark.parametrize("transformer", [dict(num_layers=5),
                                         dict(num_layers=5, qk_norm="rms_norm", dual_attention_layers=(0, 1, 2))],
                         ids=["sd3", "sd3.5"])
@pytest.mark.parametrize("layers,start,stop", [([1, 2, 3], 0.01, 0.35), ([2, 4], 0.01, 0.3), ([0], 0.0, 1.0)])
def test_slg_in_sd3_pipeline_equals_its_skip_guidance_layers(transformer, layers, start, stop):
    pipe = _sd3_pipe(**transformer)
    kwargs = dict(**_sd3_embeds(), height=32, width=32, num_inference_steps=10, guidance_scale=4.0,
                  output_type="latent")

    def run(**extra):
        return pipe(**kwargs, **extra, generator=torch.Generator().manual_seed(1)).images
    reference = run(skip_guidance_layers=layers, skip_layer_guidance_scale=2.8, skip_layer_guidance_start=start,
                    skip_layer_guidance_stop=stop)
    with pagkit.attach(pipe, pagkit.SLG(2.8, layers=layers, start=start, stop=stop)):
        ours = run()
    plain = run()
    assert all("forward" not in vars(m) for m in pipe.transformer.modules())
    assert (reference - plain).abs().max() > 1e-3  # the comparison is not vacuous
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


def test_eval_reads_terms_from_the_methods_and_keeps_every_existing_key():
    from pagkit.evaluate import EvalConfig, expand
    inf = float("inf")
    rows = [
        (EvalConfig("fmnist", "none"), [], "fmnist_none_ddim20_n2000_seed0"),
        (EvalConfig("fmnist", "pag", scale=0.5, layers=("down.2",)),
         [pagkit.PAG(0.5, layers=["down.2"])], "fmnist_pag_s0.5_Ldown.2_ddim20_n2000_seed0"),
        (EvalConfig("fmnist", "pag", scale=2, layers=("mid",), perturbation="mask", start=0.0, stop=0.5),
         [pagkit.PAG(2, layers=["mid"], perturbation="mask", stop=0.5)],
         "fmnist_pag_s2_Lmid_mask_t0-0.5_ddim20_n2000_seed0"),
        (EvalConfig("fmnist", "seg", scale=1, layers=("mid",), sigma=inf),
         [pagkit.SEG(1, sigma=inf, layers=["mid"])], "fmnist_seg_s1_Lmid_sigmainf_ddim20_n2000_seed0"),
        (EvalConfig("fmnist", "sag", scale=0.75, layers=("mid",), seed_set=1),
         [pagkit.SAG(0.75, layer="mid")], "fmnist_sag_s0.75_Lmid_ddim20_n2000_seed1"),
        (EvalConfig("fmnist-cond", "cfg", cfg_scale=1.5, start=0.0, stop=0.5),
         [pagkit.CFG(1.5, stop=0.5)], "fmnist-cond_cfg_w1.5_t0-0.5_ddim20_n2000_seed0"),
        (EvalConfig("fmnist-cond", "cfg+pag", cfg_scale=1.5, scale=0.5, layers=("down.2",), stop=0.5),
         [pagkit.CFG(1.5), pagkit.PAG(0.5, layers=["down.2"], stop=0.5)],
         "fmnist-cond_cfg+pag_w1.5_s0.5_Ldown.2_t0-0.5_ddim20_n2000_seed0"),
        (EvalConfig("fmnist", "slg", scale=1, layers=("mid",)),
         [pagkit.SLG(1, layers=["mid"], start=0.0, stop=1.0)], "fmnist_slg_s1_Lmid_ddim20_n2000_seed0"),
        (EvalConfig("fmnist-cond", "cfg+slg", cfg_scale=1.5, scale=1, layers=("down.1",)),
         [pagkit.CFG(1.5), pagkit.SLG(1, layers=["down.1"], start=0.0, stop=1.0)],
         "fmnist-cond_cfg+slg_w1.5_s1_Ldown.1_ddim20_n2000_seed0"),
    ]
    for config, terms, key in rows:
        assert config.terms() == terms, config.method
        assert config.key == key
    sweep = expand("fmnist", ["none", "slg", "cfg+slg"], scales=(1.0, 2.0), cfg_scales=(1.5,),
                   layer_sets=(("mid",), ("down.1",)))
    assert [c.key for c in sweep][:3] == ["fmnist_none_ddim20_n2000_seed0", "fmnist_slg_s1_Lmid_ddim20_n2000_seed0",
                                          "fmnist_slg_s1_Ldown.1_ddim20_n2000_seed0"]
    assert len(sweep) == 1 + 4 + 4
    assert EvalConfig("fmnist", "cfg+seg", cfg_scale=2, scale=1).terms() == [pagkit.CFG(2), pagkit.SEG(1, layers=["mid"])]
    assert EvalConfig("fmnist", "cfg+seg", cfg_scale=2, scale=1).key == \
        "fmnist_cfg+seg_w2_s1_sigmainf_ddim20_n2000_seed0"
    with pytest.raises(ValueError, match="unknown method 'pag\\+seg'"):
        EvalConfig("fmnist", "pag+seg").terms()
