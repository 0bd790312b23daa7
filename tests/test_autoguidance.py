"""Autoguidance (Karras et al. 2024): ε̃ = ε_weak + w(ε − ε_weak), the weak model under the same condition.

References: a DDIM loop written here with plain model calls, whose guided prediction is EDM2's
``ref_Dx.lerp(Dx, guidance)`` (NVlabs/edm2 generate_images.py, edm_sampler, commit 4bf8162), i.e.
torch.lerp(ε_weak, ε, w); and, with CFG, the composition documented in pagkit.methods.autoguidance."""
import pytest
import torch

import models
import pagkit
from pagkit.denoise import GuidedDenoiser

NULL = 10
LABELS = torch.tensor([1, 7])


def _pair():
    """Two class-conditional UNets of one architecture with different weights: the model and its weak version."""
    return models.unet2d(seed=0, num_class_embeds=11), models.unet2d(seed=1, num_class_embeds=11)


def _latents(seed=0):
    return torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _sample(model, guidance, steps=4, cfg=False, **kw):
    return pagkit.sample(model, models.ddim(), batch_size=2, num_inference_steps=steps, guidance=guidance,
                         latents=_latents(), class_labels=LABELS, null_class_label=NULL if cfg else None,
                         progress_bar=False, **kw)


def _ddim_reference(guided_eps, steps=4):
    """DDIM (η = 0) by hand on models.ddim()'s schedule: leading spacing, steps_offset 1, final ᾱ = ᾱ_0."""
    scheduler = models.ddim()
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod
    x = _latents()
    for i, t in enumerate(scheduler.timesteps):
        eps = guided_eps(x, t, i / steps)
        prev = int(t) - 1000 // steps
        a_t, a_prev = alphas[int(t)], alphas[prev] if prev >= 0 else alphas[0]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def _eps(model, x, t, labels):
    return model(x, t, class_labels=labels).sample


def _count_calls(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]),
                                             with_kwargs=True)
    return calls, handle


def test_construction_errors_are_clear():
    with pytest.raises(ValueError, match="needs weak_model="):
        pagkit.AutoGuidance(2.0)
    with pytest.raises(ValueError, match="torch.nn.Module.*function"):
        pagkit.AutoGuidance(2.0, weak_model=lambda x, t: x)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        pagkit.AutoGuidance(float("nan"), weak_model=models.unet2d())
    term = pagkit.AutoGuidance(2.0, models.unet2d(), stop=0.5)
    assert term.neutral == 1.0 and term.scale_at(0.75) == 1.0 and "UNet2DModel" not in repr(term)


@pytest.mark.parametrize("cfg", [False, True])
def test_neutral_scale_is_bit_identical_and_never_calls_the_weak_model(cfg):
    model, weak = _pair()
    calls, handle = _count_calls(weak)
    try:
        extra = [pagkit.CFG(2.0)] if cfg else []
        for term in (pagkit.AutoGuidance(1.0, weak), pagkit.AutoGuidance(3.0, weak, start=0.9),
                     pagkit.AutoGuidance(1.0, weak, scale_end=1.0)):
            assert torch.equal(_sample(model, extra + [term], cfg=cfg), _sample(model, extra, cfg=cfg))
    finally:
        handle.remove()
    assert calls == []


def test_sample_equals_a_ddim_loop_on_plain_model_calls():
    model, weak = _pair()
    w = 2.5

    def guided(x, t, progress):
        return torch.lerp(_eps(weak, x, t, LABELS), _eps(model, x, t, LABELS), w)  # EDM2: ref_Dx.lerp(Dx, w)
    ours = _sample(model, [pagkit.AutoGuidance(w, weak_model=weak)])
    reference = _ddim_reference(guided)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert (ours - _sample(model, [])).abs().max() > 1e-2  # the comparison is not vacuous
    # the weak model must see the condition c: the same loop with the weak model under ∅ differs
    null = torch.full_like(LABELS, NULL)
    under_null = _ddim_reference(lambda x, t, p: torch.lerp(_eps(weak, x, t, null), _eps(model, x, t, LABELS), w))
    assert (ours - under_null).abs().max() > 1e-3


def test_schedule_interval_and_ramp_against_the_reference_loop():
    model, weak = _pair()
    term = pagkit.AutoGuidance(3.0, weak, start=0.25, stop=1.0, scale_end=1.5)

    def guided(x, t, progress):
        eps = _eps(model, x, t, LABELS)
        if not 0.25 <= progress < 1.0:
            return eps
        w = 3.0 + (1.5 - 3.0) * (progress - 0.25) / 0.75
        return torch.lerp(_eps(weak, x, t, LABELS), eps, w)
    torch.testing.assert_close(_sample(model, [term]), _ddim_reference(guided), rtol=0, atol=1e-5)


def test_with_cfg_adds_its_term_to_the_cfg_base():
    """ε̃ = ε_u + w_cfg(ε_c − ε_u) + (w − 1)(ε_c − ε_weak,c), as pagkit.methods.autoguidance documents."""
    model, weak = _pair()
    w_cfg, w = 2.0, 1.8
    null = torch.full_like(LABELS, NULL)

    def guided(x, t, progress):
        eps_c, eps_u = _eps(model, x, t, LABELS), _eps(model, x, t, null)
        return eps_u + w_cfg * (eps_c - eps_u) + (w - 1) * (eps_c - _eps(weak, x, t, LABELS))
    ours = _sample(model, [pagkit.CFG(w_cfg), pagkit.AutoGuidance(w, weak)], cfg=True)
    torch.testing.assert_close(ours, _ddim_reference(guided), rtol=0, atol=1e-5)
    assert (ours - _sample(model, [pagkit.CFG(w_cfg)], cfg=True)).abs().max() > 1e-2


def test_the_model_as_its_own_weak_model_is_unguided_exactly():
    import copy
    model, _ = _pair()
    calls, handle = _count_calls(model)
    try:
        for cfg in (False, True):
            extra = [pagkit.CFG(2.0)] if cfg else []
            assert torch.equal(_sample(model, extra + [pagkit.AutoGuidance(2.5, model)], cfg=cfg),
                               _sample(model, extra, cfg=cfg))
    finally:
        handle.remove()
    assert len(calls) == 4 * 4  # ε_weak is ε_c: no pass of its own
    # a copy is a separate model: its pass runs, on the B conditional rows as the batched forward does
    assert torch.equal(_sample(model, [pagkit.AutoGuidance(2.5, copy.deepcopy(model))]), _sample(model, []))
    # also inside a pipeline, whose denoiser's forward attach has replaced: no recursion, ε_weak = ε
    from diffusers import DDIMPipeline
    unet = models.unet2d()
    pipe = DDIMPipeline(unet=unet, scheduler=models.ddim())
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(batch_size=2, num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    plain = run()
    with pagkit.attach(pipe, pagkit.AutoGuidance(2.5, unet)):
        same = run()
    assert (same == plain).all()


def test_one_batched_forward_and_one_weak_pass_per_step():
    model, weak = _pair()
    main_calls, h1 = _count_calls(model)
    weak_calls, h2 = _count_calls(weak)
    try:
        _sample(model, [pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid"), pagkit.AutoGuidance(2.0, weak)], cfg=True)
    finally:
        h1.remove()
        h2.remove()
    assert main_calls == [6] * 4  # uncond, cond, pag: one call per step
    assert weak_calls == [2] * 4  # the conditional rows only


@pytest.mark.parametrize("weak,message", [
    (lambda: models.unet2d(seed=1), "num_class_embeds is None on the weak model, 11 on the model"),
    (lambda: models.unet2d(seed=1, num_class_embeds=11, in_channels=2, out_channels=2), "in_channels is 2"),
    (lambda: models.unet2d(seed=1, num_class_embeds=11, sample_size=32), "sample_size is 32"),
    (lambda: models.unet2d(seed=1, num_class_embeds=11, out_channels=3), "output channels .* 3 on the weak"),
    (lambda: models.sd_unet(), "in_channels is 4 .* \\(and 3 more: num_class_embeds"),
    (lambda: models.dit(), "DiTTransformer2DModel .*family.*same family"),
    (lambda: models.unet2d(seed=1, num_class_embeds=11).double(), "torch.float64.*weak_model.to"),
    (lambda: torch.nn.Linear(2, 2), "does not know the model family of Linear"),
])
def test_an_incompatible_weak_model_fails_at_bind_time(weak, message):
    model = _pair()[0]
    weak = weak()
    calls, handle = _count_calls(weak)
    try:
        with pytest.raises(ValueError, match=message):
            GuidedDenoiser(model, [pagkit.AutoGuidance(2.0, weak)])
        with pytest.raises(ValueError, match=message):
            _sample(model, [pagkit.AutoGuidance(2.0, weak)])
    finally:
        handle.remove()
    assert calls == []


def test_weak_model_runs_in_eval_mode_and_is_left_as_it_was():
    model, weak = _pair()
    weak.train()
    weak.up_blocks[0].eval()  # mixed flags come back as they were, module by module
    flags = {name: m.training for name, m in weak.named_modules()}
    state = {k: v.clone() for k, v in weak.state_dict().items()}
    seen = []
    handle = weak.register_forward_pre_hook(lambda m, a, k: seen.append(any(x.training for x in m.modules())),
                                            with_kwargs=True)
    try:
        with torch.enable_grad():
            x = _sample(model, [pagkit.AutoGuidance(2.0, weak)], steps=2)
    finally:
        handle.remove()
    assert seen == [False, False]
    assert {name: m.training for name, m in weak.named_modules()} == flags
    new_state = weak.state_dict()
    assert all(torch.equal(new_state[k], v) for k, v in state.items())
    assert all(p.grad is None for p in weak.parameters())
    weak.eval()
    torch.testing.assert_close(x, _sample(model, [pagkit.AutoGuidance(2.0, weak)], steps=2), rtol=0, atol=0)


def test_restored_after_an_exception_in_either_model():
    model, weak = _pair()
    x, t = _latents(), torch.tensor(500)
    before = _eps(model, x, t, LABELS)
    processors = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    weak.train()

    def explode(*args, **kwargs):
        raise RuntimeError("boom")
    for failing in (weak, model):
        handle = failing.register_forward_hook(explode)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                _sample(model, [pagkit.PAG(1.0, layers="mid"), pagkit.AutoGuidance(2.0, weak)])
        finally:
            handle.remove()
        assert all("forward" not in vars(m) for m in model.modules())
        assert all(model.get_submodule(name).processor is p for name, p in processors.items())
        assert all(m.training for m in weak.modules())  # its training flags are back
        assert torch.equal(_eps(model, x, t, LABELS), before)


def test_on_a_learned_sigma_transformer_only_eps_is_guided():
    """DiT predicts ε and a variance: ε̃ = ε_weak + w(ε − ε_weak) on the ε half, the model's own variance kept."""
    model, weak = models.dit(seed=0), models.dit(seed=1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t, cond = torch.tensor([300, 300]), {"class_labels": torch.tensor([3, 5])}
    out = GuidedDenoiser(model, [pagkit.AutoGuidance(2.0, weak)]).predict(x, t, cond, progress=0.0)
    main, ref = model(x, t, **cond).sample, weak(x, t, **cond).sample
    expected = torch.cat([torch.lerp(ref[:, :4], main[:, :4], 2.0), main[:, 4:]], dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
