"""Sana and Sana 1.5 (linear attention, no SDPA call) through the contract invariants.

The reference replaces the processor of the chosen ``attn1`` modules with one written here: the attention map
A = φ(Q)φ(K)ᵀ (φ = ReLU) built explicitly and normalised by its row sums, after the model's own projections and
QK-norm. PAG's identity gives V; SEG's σ = ∞ makes every query feature the mean φ(q) (backends/sana.py).
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402

import pagkit  # noqa: E402
from pagkit.denoise import GuidedDenoiser  # noqa: E402
from pagkit.perturb import Identity, LogitNoise, QueryBlur, RandomMask, Uniform  # noqa: E402
from pagkit.routing import Segment, routed  # noqa: E402

VARIANTS = {"sana": None, "sana1.5": "rms_norm_across_heads"}


class _ReferenceLinearAttention:
    """``SanaLinearAttnProcessor2_0`` with an explicit attention map; ``mode``: plain, identity or uniform."""

    def __init__(self, mode):
        self.mode = mode

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2).double() for t in (q, k, v))  # (B, H, S, d)
        if self.mode == "identity":
            out = v
        else:
            phi_q, phi_k = F.relu(q), F.relu(k)
            if self.mode == "uniform":
                phi_q = phi_q.mean(dim=2, keepdim=True).expand_as(phi_q)
            a = phi_q @ phi_k.transpose(-1, -2)  # (B, H, S, S)
            out = (a / (a.sum(dim=-1, keepdim=True) + 1e-15)) @ v
        out = out.transpose(1, 2).flatten(2).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _reference(monkeypatch, model, names, mode):
    modules = dict(model.named_modules())
    for name in names:
        monkeypatch.setattr(modules[name], "processor", _ReferenceLinearAttention(mode))


def _forward(model, x, t, cond):
    return model(x, timestep=t, **cond, return_dict=False)[0]


def _perturbed(model, names, perturbation, x, t, cond, rows=None):
    backend = GuidedDenoiser(model, []).backend
    with routed(model, names) as router:
        router.info = backend.forward_info(model, x, cond)
        router.plan = [Segment(*(rows or (0, x.shape[0])), {n: perturbation for n in names})]
        return _forward(model, x, t, cond)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("variant", VARIANTS)
def test_sites_are_the_linear_self_attention_only(variant):
    model = models.sana(qk_norm=VARIANTS[variant], patch_size=2)
    infos = pagkit.layers(model)
    assert [(i.name, i.kind) for i in infos] == [("transformer_blocks.0.attn1", "self"),
                                                 ("transformer_blocks.1.attn1", "self")]
    assert pagkit.resolve_layers(model, "blocks.1") == ["transformer_blocks.1.attn1"]
    with pytest.raises(ValueError, match="not a perturbable site|cross-attention"):
        pagkit.resolve_layers(model, "transformer_blocks.0.attn2")
    x, t, cond = models.sana_inputs(h=6, w=8)
    site = GuidedDenoiser(model, []).backend.sites(model)[0]
    backend = GuidedDenoiser(model, []).backend
    assert backend.layout(site, 12, backend.forward_info(model, x, cond)).grid == (3, 4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_reference_is_the_models_own_linear_attention(variant, monkeypatch):
    model = models.sana(qk_norm=VARIANTS[variant])
    x, t, cond = models.sana_inputs()
    names = [i.name for i in pagkit.layers(model)]
    plain = _forward(model, x, t, cond)
    _reference(monkeypatch, model, names, "plain")
    torch.testing.assert_close(_forward(model, x, t, cond), plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["identity", "strict", "uniform"])
def test_perturbed_branch_equals_the_explicit_reference(variant, mode, monkeypatch):
    model = models.sana(qk_norm=VARIANTS[variant])
    x, t, cond = models.sana_inputs()
    perturbation = {"identity": Identity(), "strict": Identity(strict=True), "uniform": Uniform()}[mode]
    all_names = [i.name for i in pagkit.layers(model)]
    plain = _forward(model, x, t, cond)
    for names in (all_names[:1], all_names[1:], all_names):
        ours = _perturbed(model, names, perturbation, x, t, cond)
        with monkeypatch.context() as m:
            _reference(m, model, names, "uniform" if mode == "uniform" else "identity")
            expected = _forward(model, x, t, cond)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
        assert (ours - plain).abs().max() > 1e-3, names


def test_identity_is_diffusers_pag_identity_processor_on_the_perturbed_rows():
    """Without QK-norm, pagkit's identity rows are what PAGIdentitySanaLinearAttnProcessor2_0 computes."""
    from diffusers.models.attention_processor import PAGIdentitySanaLinearAttnProcessor2_0

    model = models.sana()
    x, t, cond = models.sana_inputs()
    name = "transformer_blocks.1.attn1"
    ours = _perturbed(model, [name], Identity(), x, t, cond)
    module = model.get_submodule(name)
    original = module.processor
    module.processor = PAGIdentitySanaLinearAttnProcessor2_0()  # [c; perturbed c]: rows 0 plain, 1 perturbed
    try:
        doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
        theirs = _forward(model, torch.cat([x, x]), torch.cat([t, t]), doubled)[x.shape[0]:]
    finally:
        module.processor = original
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_neutral_scale_and_untouched_rows_are_bit_identical(variant):
    model = models.sana(qk_norm=VARIANTS[variant])
    x, t, cond = models.sana_inputs(batch=3)
    plain = _forward(model, x, t, cond)
    names = [i.name for i in pagkit.layers(model)]
    neutral = GuidedDenoiser(model, [pagkit.PAG(0.0, layers=names)]).predict(x, t, cond)
    assert torch.equal(neutral, plain)
    for perturbation in (Identity(), QueryBlur(1.0), Uniform()):
        out = _perturbed(model, names, perturbation, x, t, cond, rows=(1, 2))
        assert torch.equal(out[0], plain[0]) and torch.equal(out[2], plain[2])
        assert not torch.allclose(out[1], plain[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefix_sharing_is_exact_and_batched_equals_separate(variant):
    model = models.sana(qk_norm=VARIANTS[variant])
    x, t, cond = models.sana_inputs()
    last = pagkit.layers(model)[-1].name
    terms = [pagkit.PAG(2.0, layers=last), pagkit.SEG(1.5, layers=last)]
    shared = GuidedDenoiser(model, terms).predict(x, t, cond)
    full = GuidedDenoiser(model, terms, prefix_sharing=False).predict(x, t, cond)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    eps = _forward(model, x, t, cond)
    separate = (eps + 2.0 * (eps - _perturbed(model, [last], Identity(), x, t, cond))
                + 1.5 * (eps - _perturbed(model, [last], Uniform(), x, t, cond)))
    torch.testing.assert_close(full, separate, rtol=0, atol=1e-5)


def test_seg_blur_follows_the_grid_and_tends_to_uniform():
    """A finite σ blurs φ(Q) over the real 3×4 grid: between plain and σ = ∞, and at large σ close to uniform."""
    model = models.sana(patch_size=2)
    x, t, cond = models.sana_inputs(h=6, w=8)
    names = ["transformer_blocks.0.attn1"]
    plain = _forward(model, x, t, cond)
    uniform = _perturbed(model, names, Uniform(), x, t, cond)
    small, large = (_perturbed(model, names, QueryBlur(s), x, t, cond) for s in (0.5, 500.0))
    assert 1e-4 < (small - plain).abs().max() and (large - uniform).abs().max() < (small - uniform).abs().max()


@pytest.mark.parametrize("perturbation", [RandomMask(0.5), LogitNoise(1.0)])
def test_logit_perturbations_are_refused_and_the_model_restored(perturbation):
    model = models.sana()
    x, t, cond = models.sana_inputs()
    before = _forward(model, x, t, cond)
    with pytest.raises(ValueError, match="linear.*no softmax logits"):
        _perturbed(model, ["transformer_blocks.0.attn1"], perturbation, x, t, cond)
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(_forward(model, x, t, cond), before)


def test_model_is_restored_after_an_exception():
    model = models.sana(qk_norm="rms_norm_across_heads")
    x, t, cond = models.sana_inputs()
    before = _forward(model, x, t, cond)
    names = [i.name for i in pagkit.layers(model)]
    with pytest.raises(KeyError):
        with routed(model, names) as router:
            router.plan = [Segment(0, 2, {n: Identity() for n in names})]
            raise KeyError("boom")
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(_forward(model, x, t, cond), before)
