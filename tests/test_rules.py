"""Combination rules (pagkit.methods.rules): APG and CFG-Zero* on any term's difference.

References: diffusers 0.42.1's guiders (``normalized_guidance`` + ``MomentumBuffer`` of
guiders/adaptive_projected_guidance.py; ``ClassifierFreeZeroStarGuidance`` / ``cfg_zero_star_scale`` of
guiders/classifier_free_zero_star_guidance.py), driven on the same tensors, and the papers' formulas written
out here (``paper_apg``, x̂₀ conversions) where diffusers has no counterpart (PAG's difference, x₀ space).

Where diffusers differs from the paper: its APG default (``use_original_formulation=False``) returns
D_u + w·Δ', the paper's Algorithm 1 (and pagkit) D_c + (w − 1)·Δ'. The two agree only at η = 1 without cap or
momentum; diffusers' ``use_original_formulation=True`` with scale w − 1 is the paper's, and is what pagkit is
compared with. The projection dims (all but the batch), the momentum order (Δ̄ = Δ + βΔ̄_prev, before the cap)
and the cap (‖Δ̄‖ ≤ r, r = 0 off) are the paper's in diffusers too.
"""
import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.guiders.classifier_free_zero_star_guidance import ClassifierFreeZeroStarGuidance, cfg_zero_star_scale

import models
import pagkit
from pagkit import APG, CFG, PAG, SAG, SEG, SLG, CFGZeroStar
from pagkit.denoise import GuidedDenoiser
from pagkit.methods.base import Context, Step, bind
from pagkit.methods.rules import optimized_scale
from pagkit.routing import SKIP, Segment, routed

NULL = 10
W = 4.0


def _step(cond, uncond=None, x=None, t=500):
    eps = {"cond": cond} if uncond is None else {"cond": cond, "uncond": uncond}
    return Step(x=x, t=t, inputs={}, eps=eps, captured={}, call=None)


def _bound(term, scheduler=None):
    return bind(term, "t0", Context(model=None, backend=None, scheduler=scheduler))


def paper_apg(delta, direction, eta, r, beta, state):
    """Sadat et al. 2025, Algorithm 1, written out: Δ̄ = Δ + βΔ̄_prev; Δ̄·min(1, r/‖Δ̄‖); Δ̄⊥ + ηΔ̄∥ along ``direction``."""
    if beta:
        if "avg" in state:
            delta = delta + beta * state["avg"]
        state["avg"] = delta
    if r:
        norm = delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.ndim - 1))
        delta = delta * torch.clamp(r / norm, max=1.0)
    v, d = delta.flatten(1).double(), direction.flatten(1).double()
    parallel = (v * d).sum(1, keepdim=True) / (d * d).sum(1, keepdim=True) * d
    return (v - parallel + eta * parallel).view_as(delta).to(delta.dtype)


APG_CASES = [dict(eta=0.0, norm_threshold=15.0, momentum=-0.5), dict(eta=0.3, norm_threshold=5.0, momentum=-0.75),
             dict(eta=0.0), dict(eta=1.0, norm_threshold=3.0), dict(eta=0.5, momentum=0.4)]


# ---- the rules on CFG's difference, against diffusers' guiders on the same tensors ----

@pytest.mark.parametrize("case", APG_CASES, ids=str)
def test_apg_on_cfg_equals_diffusers_normalized_guidance_across_steps(case):
    g = torch.Generator().manual_seed(0)
    bound = _bound(CFG(W, rule=APG(**case)))
    buffer = MomentumBuffer(case["momentum"]) if case.get("momentum") else None
    for _ in range(4):  # momentum carries over the steps
        c, u = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g) * 3
        ours = bound.combine(W, _step(c, u))
        # the paper's D_c + (w − 1)Δ' is diffusers' use_original_formulation=True at scale w − 1
        ref = normalized_guidance(c, u, W - 1, buffer, case["eta"], case.get("norm_threshold") or 0.0,
                                  use_original_formulation=True)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        state = {}
        if not case.get("momentum"):
            assert torch.allclose(ours, c + (W - 1) * paper_apg(c - u, c, case["eta"], case.get("norm_threshold"),
                                                                0.0, state), rtol=1e-6, atol=1e-6)


def test_diffusers_default_apg_formulation_is_not_the_papers():
    """diffusers' default D_u + w·Δ' differs from the paper's D_c + (w − 1)·Δ' by (1 − η)Δ∥: pagkit follows the paper."""
    g = torch.Generator().manual_seed(1)
    c, u = torch.randn(2, 4, 8, 8, generator=g) + 1, torch.randn(2, 4, 8, 8, generator=g)
    ours = _bound(CFG(W, rule=APG(eta=0.0))).combine(W, _step(c, u))
    default = normalized_guidance(c, u, W, None, 0.0, 0.0)
    assert not torch.allclose(ours, default, atol=1e-3)
    d = (c - u).flatten(1).double()
    unit = c.flatten(1).double() / c.flatten(1).double().norm(dim=1, keepdim=True)
    parallel = ((d * unit).sum(1, keepdim=True) * unit).view_as(c).float()
    torch.testing.assert_close(ours - default, parallel, rtol=1e-5, atol=1e-5)  # Δ − Δ' = (1 − η)Δ∥, η = 0
    # and at η = 1 without cap or momentum the two formulations agree (both are CFG)
    torch.testing.assert_close(normalized_guidance(c, u, W, None, 1.0, 0.0),
                               _bound(CFG(W, rule=APG(eta=1.0))).combine(W, _step(c, u)), rtol=1e-6, atol=1e-6)


def test_cfg_zero_star_on_cfg_equals_diffusers_guider():
    g = torch.Generator().manual_seed(2)
    bound = _bound(CFG(W, rule=CFGZeroStar(zero_init_steps=2)))
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=W, zero_init_steps=2)
    for i in range(5):
        c, u = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g) * 0.5 + 0.3
        guider.set_state(step=i, num_inference_steps=5, timestep=torch.tensor(900 - 100 * i))
        ref = guider.forward(c, u).pred
        torch.testing.assert_close(optimized_scale(c, u).flatten(), cfg_zero_star_scale(c.flatten(1), u.flatten(1)).flatten())
        if bound.rule.zeroes(i):
            assert i < 2 and torch.equal(ref, torch.zeros_like(c))
        else:
            assert i >= 2
            torch.testing.assert_close(bound.combine(W, _step(c, u)), ref, rtol=1e-6, atol=1e-6)


# ---- sampling: the rule inside the one guided prediction, against reference loops written here ----

@torch.no_grad()
def _unet_loop(model, latents, steps, guided_eps, cond=None, uncond=None):
    """A plain DDIM loop; ``guided_eps(i, t, x, eps_c, eps_u, eps_pag)`` gives ε̃ from separate forwards."""
    scheduler = models.ddim()
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    names = pagkit.resolve_layers(model, "mid")
    for i, t in enumerate(scheduler.timesteps):
        eps_c = model(x, t, **(cond or {})).sample
        eps_u = model(x, t, **uncond).sample if uncond is not None else None
        with routed(model, names) as router:
            router.input_hw = tuple(x.shape[-2:])
            router.plan = [Segment(0, x.shape[0], {n: PAG().make_perturbation() for n in names})]
            eps_pag = model(x, t, **(cond or {})).sample
        x = scheduler.step(guided_eps(i, t, x, eps_c, eps_u, eps_pag), t, x).prev_sample
    return x


def _close(ours, reference):
    """Equal up to float noise of batched vs separate forwards over a loop: 1e-6 of the samples' scale (|x| ≈ 25
    here; plain CFG, no rule, differs from its separate-forward loop by 1.7e-5 at that scale)."""
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6 * float(reference.abs().max()) + 1e-6)


def _sample(model, guidance, latents, steps, **kw):
    return pagkit.sample(model, models.ddim(), batch_size=latents.shape[0], num_inference_steps=steps,
                         guidance=guidance, latents=latents, progress_bar=False, **kw)


@pytest.mark.parametrize("space", ["model", "x0"])
def test_pag_with_apg_in_sample_equals_the_papers_formula_on_its_difference(space):
    model, steps, s = models.unet2d(), 6, 2.0
    latents = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    eta, r, beta = 0.0, 4.0, -0.5
    term = PAG(s, layers="mid", start=0.0, stop=5 / 6, rule=APG(eta=eta, norm_threshold=r, momentum=beta, space=space))
    ours = _sample(model, [term], latents, steps)
    alphas = models.ddim().alphas_cumprod.double()
    state = {}

    def guided(i, t, x, eps_c, eps_u, eps_pag):
        if not i / steps < 5 / 6:  # PAG's schedule: the rule (and its momentum) acts only where the term does
            return eps_c
        if space == "model":
            return eps_c + s * paper_apg(eps_c - eps_pag, eps_c, eta, r, beta, state)
        a = float(alphas[int(t)])
        d_c, d_pag = [(x - (1 - a) ** 0.5 * e) / a ** 0.5 for e in (eps_c, eps_pag)]  # x̂₀ of each branch
        d_guided = d_c + s * paper_apg(d_c - d_pag, d_c, eta, r, beta, state)
        return (x - a ** 0.5 * d_guided) / (1 - a) ** 0.5  # back to ε

    reference = _unet_loop(model, latents, steps, guided)
    plain = _sample(model, [PAG(s, layers="mid", stop=5 / 6)], latents, steps)
    assert (plain - reference).abs().max() > 1e-3  # the rule matters
    _close(ours, reference)


def test_cfg_with_rules_in_sample_equals_loops_driving_diffusers_guiders():
    model, steps = models.unet2d(num_class_embeds=11), 5
    latents = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    cond, uncond = {"class_labels": torch.tensor([3, 4])}, {"class_labels": torch.tensor([NULL, NULL])}
    labels = dict(class_labels=torch.tensor([3, 4]), null_class_label=NULL)

    guider = ClassifierFreeZeroStarGuidance(guidance_scale=W, zero_init_steps=1)

    def zero_star(i, t, x, eps_c, eps_u, eps_pag):
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        return guider.forward(eps_c, eps_u).pred
    ours = _sample(model, [CFG(W, rule=CFGZeroStar(zero_init_steps=1))], latents, steps, **labels)
    _close(ours, _unet_loop(model, latents, steps, zero_star, cond, uncond))

    buffer = MomentumBuffer(-0.5)

    def apg(i, t, x, eps_c, eps_u, eps_pag):
        return normalized_guidance(eps_c, eps_u, W - 1, buffer, 0.0, 5.0, use_original_formulation=True)
    ours = _sample(model, [CFG(W, rule=APG(eta=0.0, norm_threshold=5.0, momentum=-0.5))], latents, steps, **labels)
    _close(ours, _unet_loop(model, latents, steps, apg, cond, uncond))


def test_rules_on_cfg_and_pag_together_zero_init_and_one_batched_forward():
    model, steps, s = models.unet2d(num_class_embeds=11), 4, 1.5
    latents = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    cond, uncond = {"class_labels": torch.tensor([3, 4])}, {"class_labels": torch.tensor([NULL, NULL])}
    terms = [CFG(W, rule=CFGZeroStar(zero_init_steps=1)), PAG(s, layers="mid", rule=APG(eta=0.2, momentum=-0.5))]
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        ours = _sample(model, terms, latents, steps, class_labels=torch.tensor([3, 4]), null_class_label=NULL)
    finally:
        handle.remove()
    assert calls == [6] * steps  # uncond, cond, pag: one call per step, zeroed steps included
    state = {}

    def guided(i, t, x, eps_c, eps_u, eps_pag):
        pag = s * paper_apg(eps_c - eps_pag, eps_c, 0.2, None, -0.5, state)  # momentum runs on the zeroed step too
        if i < 1:
            return torch.zeros_like(eps_c)
        star = optimized_scale(eps_c, eps_u)
        return star * eps_u + W * (eps_c - star * eps_u) + pag
    _close(ours, _unet_loop(model, latents, steps, guided, cond, uncond))


def test_rules_on_seg_and_sag_use_their_own_difference():
    """SEG's ε_c − ε_seg and SAG's ε(x_t) − ε(x̃_t) through the rule: the term's contribution is k·Δ'."""
    model = models.unet2d()
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6)), torch.tensor(500)
    for term_cls, kw in ((SEG, dict(layers="mid")), (SAG, dict(layer="mid"))):
        plain = GuidedDenoiser(model, [term_cls(1.0, **kw)], scheduler=models.ddim())
        ruled = GuidedDenoiser(model, [term_cls(2.0, **kw, rule=CFGZeroStar())], scheduler=models.ddim())
        eps_c = model(x, t).sample
        eps_neg = 2 * eps_c - plain.predict(x, t, progress=0.5)  # ε_c + (ε_c − ε_neg)
        star = optimized_scale(eps_c, eps_neg)
        torch.testing.assert_close(ruled.predict(x, t, progress=0.5), eps_c + 2.0 * (eps_c - star * eps_neg),
                                   rtol=0, atol=1e-5)


# ---- neutral parameters, state, errors ----

@pytest.mark.parametrize("rule", [APG(eta=1.0), APG(eta=1.0, norm_threshold=0.0, space="x0"),
                                  CFGZeroStar(optimized_scale=False)], ids=repr)
def test_neutral_rules_are_bit_identical_to_no_rule(rule):
    model = models.unet2d(num_class_embeds=11)
    latents = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    labels = dict(class_labels=torch.tensor([1, 2]), null_class_label=NULL)
    for terms in ([CFG(3.0), PAG(2.0, layers="mid")], [CFG(3.0), SLG(1.0, layers="mid", start=0.0)]):
        ruled = [dataclasses.replace(term, rule=rule) for term in terms]
        assert torch.equal(_sample(model, ruled, latents, 4, **labels), _sample(model, terms, latents, 4, **labels))


def test_momentum_state_resets_at_each_run():
    model = models.unet2d()
    latents = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    terms = [PAG(2.0, layers="mid", rule=APG(eta=0.0, momentum=-0.75))]
    assert torch.equal(_sample(model, terms, latents, 4), _sample(model, terms, latents, 4))
    denoiser, x, ts = GuidedDenoiser(model, terms), latents, [torch.tensor(t) for t in (900, 600, 300)]

    def run():
        return [denoiser.predict(x, t, progress=i / 3) for i, t in enumerate(ts)]
    first, second = run(), run()  # one denoiser, two runs: progress goes back to 0, the momentum restarts
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert denoiser.rules[0].average is not None
    fresh = GuidedDenoiser(model, [PAG(2.0, layers="mid", rule=APG(eta=0.0))])
    assert not torch.allclose(first[1], fresh.predict(x, ts[1], progress=1 / 3), atol=1e-4)  # momentum acted


def test_bad_rule_parameters_are_clear_value_errors():
    for kw, match in ((dict(eta=1.5), r"eta must be in \[0, 1\]"), (dict(eta=-0.1), r"eta must be in \[0, 1\]"),
                      (dict(momentum=1.0), r"momentum must be in \(-1, 1\)"),
                      (dict(momentum=float("nan")), "finite"),
                      (dict(norm_threshold=-2.0), "norm_threshold must be > 0"),
                      (dict(space="eps"), "space must be 'model'.*or 'x0'")):
        with pytest.raises(ValueError, match=match):
            APG(**kw)
    for kw in (dict(zero_init_steps=-1), dict(zero_init_steps=1.5), dict(zero_init_steps=True),
               dict(optimized_scale="yes")):
        with pytest.raises(ValueError, match="CFGZeroStar"):
            CFGZeroStar(**kw)
    with pytest.raises(ValueError, match=r"rule must be None or a combination rule \(APG, CFGZeroStar\)"):
        PAG(2.0, rule="apg")
    model = models.unet2d()
    with pytest.raises(ValueError, match="space='x0'.*scheduler"):  # at construction, before any sampling
        GuidedDenoiser(model, [PAG(2.0, rule=APG(space="x0"))])
    with pytest.raises(ValueError, match="space='x0'.*scheduler"):
        GuidedDenoiser(model, [PAG(2.0, rule=APG(space="x0"))], scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="CFG's rule"):
        GuidedDenoiser(models.unet2d(num_class_embeds=11), [CFG(2.0, rule=APG())]).predict(
            torch.randn(2, 1, 16, 16), torch.tensor(500), {"class_labels": torch.tensor([1, 2])},
            {"class_labels": torch.tensor([NULL, NULL])}, external_cfg=2.0)


# ---- inside a diffusers pipeline (pagkit.attach) ----

def _sd3_pipe():
    pipe = StableDiffusion3Pipeline(transformer=models.sd3(num_layers=4), vae=models.vae(shift_factor=0.1),
                                    scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 5, 24, generator=g), negative_prompt_embeds=torch.randn(1, 5, 24, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 12, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 12, generator=g))
    return pipe, dict(**embeds, height=32, width=32, num_inference_steps=4, guidance_scale=W, output_type="latent")


def test_rules_on_slg_inside_attach_match_the_formula_on_each_call():
    pipe, kwargs = _sd3_pipe()
    model, s, blocks = pipe.transformer, 2.0, ["transformer_blocks.1", "transformer_blocks.2"]
    term = SLG(s, layers=[1, 2], start=0.0, stop=1.0, rule=APG(eta=0.0, norm_threshold=2.0, momentum=-0.5))
    zero = SLG(s, layers=[1, 2], start=0.0, stop=1.0, rule=CFGZeroStar(zero_init_steps=1))
    for terms in ([term], [zero]):
        calls = []
        handle = model.register_forward_hook(lambda m, a, kw, out: calls.append((dict(kw), out[0])), with_kwargs=True)
        try:
            for _ in range(2):  # two runs under one attach: the second starts afresh
                with pagkit.attach(pipe, *terms):
                    pipe(**kwargs, generator=torch.Generator().manual_seed(1))
        finally:
            handle.remove()
        assert len(calls) == 8 and all("forward" not in vars(m) for m in model.modules())
        state = {}
        for n, (kw, out) in enumerate(calls):
            out = out.detach()
            if n == 4:  # the second run
                state = {}
            kw = {k: v for k, v in kw.items() if k != "return_dict"}
            plain = model(**kw, return_dict=False)[0]
            eps_u, eps_c = plain.chunk(2)
            cond = {k: v[1:] if torch.is_tensor(v) and v.shape[0] == 2 else v for k, v in kw.items()}
            with routed(model, blocks) as router:
                router.plan = [Segment(0, 1, {b: SKIP for b in blocks})]
                eps_skip = model(**cond, return_dict=False)[0]
            if n % 4 == 0:  # step 0: SLG's interval is open (start < i/N), so only zero-init acts there
                if terms[0] is zero:  # the pipeline's ε_u + w(ε_c' − ε_u) is 0: both halves are
                    assert torch.equal(out, torch.zeros_like(out))
                else:
                    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
                continue
            if terms[0] is zero:
                delta = eps_c - optimized_scale(eps_c, eps_skip) * eps_skip
            else:
                delta = paper_apg(eps_c - eps_skip, eps_c, 0.0, 2.0, -0.5, state)
            expected = torch.cat([eps_u, eps_c + s * delta / W])  # [ε_u, ε_c + Δ/w] for the pipeline's CFG
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_zero_init_with_a_pipelines_separate_cfg_call_zeroes_both_calls():
    """Flux's true_cfg_scale runs ε_u as a call of its own: at a zeroed step both calls return 0."""
    from test_pipelines_without_pag import FLUX_LAYERS, _flux
    pipe, kwargs = _flux("true_cfg")
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, kw, out: outputs.append(out[0].detach()),
                                                    with_kwargs=True)
    try:
        with pagkit.attach(pipe, PAG(2.0, layers=FLUX_LAYERS, rule=CFGZeroStar(optimized_scale=False,
                                                                              zero_init_steps=1))):
            pipe(**kwargs, generator=torch.Generator().manual_seed(1))
    finally:
        handle.remove()
    assert len(outputs) == 2 * kwargs["num_inference_steps"]
    assert all(torch.equal(o, torch.zeros_like(o)) for o in outputs[:2])  # step 0: conditional and unconditional
    assert all(o.abs().max() > 1e-3 for o in outputs[2:])


def test_a_rule_on_the_pipelines_own_cfg_is_refused():
    pipe, _ = _sd3_pipe()
    with pytest.raises(ValueError, match="rule on CFG.*cannot act"):
        with pagkit.attach(pipe, CFG(W, rule=CFGZeroStar())):
            pass
    assert "forward" not in vars(pipe.transformer)


def test_a_run_with_rules_that_fails_leaves_the_model_as_it_was():
    model = models.unet2d()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor(500)
    before = model(x, t).sample
    terms = [PAG(2.0, layers="mid", rule=APG(momentum=-0.5)), SLG(1.0, layers="down.1", start=0.0,
                                                                   rule=CFGZeroStar(zero_init_steps=1))]

    def explode(*a):
        raise RuntimeError("boom")
    handle = model.mid_block.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        GuidedDenoiser(model, terms).predict(x, t, progress=0.5)
    handle.remove()
    assert all("forward" not in vars(m) for m in model.modules())
    assert torch.equal(model(x, t).sample, before)
