"""SoftPAG and head-level PAG (HeadHunter, arXiv 2506.10978): ``PAG(heads=..., strength=α)``, A' = (1 − α)A + αI on
the chosen heads of each site.

The reference is written here: at the chosen modules, the attention call their processor makes is replaced
(tests/contract/reference.py) by an explicit per-head computation, A = softmax(QKᵀ/√d + M) built as a matrix,
A_I the identity map (on a joint or single-stream sequence the explicit −∞ mask off the image→image diagonal,
so image queries keep their attention to text and text rows are A's), and A' = (1 − α)A + αA_I on the chosen heads.
QK-norm and RoPE stay the model's own.
"""
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models import attention_processor
from diffusers.models.transformers import transformer_lumina2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from contract.reference import patch_attention  # noqa: E402

import pagkit  # noqa: E402
from pagkit.denoise import GuidedDenoiser  # noqa: E402
from pagkit.perturb import Identity, SoftIdentity  # noqa: E402
from pagkit.routing import Segment, routed  # noqa: E402

F_MODULES = (attention_processor, transformer_lumina2)


def soft_attention(q, k, v, image, heads, alpha, attn_mask=None, scale=None, **_):
    """(B, H, S, d) → (B, H, S, d): A' = (1 − α)A + αA_I on ``heads`` (None: all), A elsewhere, times V."""
    if k.shape[1] != q.shape[1]:  # grouped-query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-1, -2) * s
    mask = torch.zeros(logits.shape)
    if attn_mask is not None:
        mask = mask + (torch.zeros(attn_mask.shape).masked_fill(~attn_mask, float("-inf"))
                       if attn_mask.dtype == torch.bool else attn_mask)
    a, b = image
    block = torch.full((b - a, b - a), float("-inf"))
    block.fill_diagonal_(0.0)
    identity_mask = mask.clone()
    identity_mask[..., a:b, a:b] = identity_mask[..., a:b, a:b] + block
    attention, identity = torch.softmax(logits + mask, dim=-1), torch.softmax(logits + identity_mask, dim=-1)
    chosen = list(range(q.shape[1])) if heads is None else list(heads)
    mixed = attention.clone()
    mixed[:, chosen] = (1 - alpha) * attention[:, chosen] + alpha * identity[:, chosen]
    return mixed @ v


def _unet():
    model = models.sd_unet()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    return model, x, torch.tensor(400), {"encoder_hidden_states": torch.randn(2, 7, 24)}


def _sd3():
    return (models.sd3(), *models.sd3_inputs())


def _lumina2():
    return (models.lumina2(), *models.lumina2_inputs())


def _forward(model, x, t, cond):
    return GuidedDenoiser(model, []).backend.call(model, x, t, cond)


def _image(model, name, x, seq_len):
    site = {s.name: s for s in GuidedDenoiser(model, []).backend.sites(model)}[name]
    if site.kind == "self":
        return 0, seq_len
    n = (x.shape[-2] // model.config.patch_size) * (x.shape[-1] // model.config.patch_size)
    return (0, n) if site.image_first else (seq_len - n, seq_len)


CASES = {  # model, {site: heads}, strength
    "unet": (_unet, {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": (0, 2),
                     "up_blocks.1.attentions.1.transformer_blocks.0.attn1": (3,)}, 0.3),
    "unet-all-heads-soft": (_unet, {"mid_block.attentions.0.transformer_blocks.0.attn1": None}, 0.6),
    "sd3-joint": (_sd3, {"transformer_blocks.1.attn": (1,)}, 0.4),
    "sd3-joint-hard": (_sd3, {"transformer_blocks.0.attn": (0,), "transformer_blocks.2.attn": (1,)}, 1.0),
    "lumina2-gqa": (_lumina2, {"noise_refiner.0.attn": (1,), "layers.1.attn": (0, 2)}, 0.7),
}


@pytest.mark.parametrize("case", CASES)
def test_chosen_heads_equal_the_explicit_per_head_mixture(case, monkeypatch):
    build, chosen, alpha = CASES[case]
    model, x, t, cond = build()
    names = list(chosen)
    backend = GuidedDenoiser(model, []).backend
    with routed(model, names) as router:
        router.info = backend.forward_info(model, x, cond)
        router.plan = [Segment(0, x.shape[0], {n: SoftIdentity(alpha, chosen[n]) for n in names})]
        ours = _forward(model, x, t, cond)
    with monkeypatch.context() as m:
        patch_attention(m, model, names, lambda name, q, k, v, **kw: soft_attention(
            q, k, v, _image(model, name, x, q.shape[-2]), chosen[name], alpha, **kw), F_MODULES, ())
        expected = _forward(model, x, t, cond)
    plain = _forward(model, x, t, cond)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the perturbation changed something

    # the term: PAG(heads={site: heads}, strength=α) in the guided step is ε_c + s(ε_c − that branch)
    if all(h is not None for h in chosen.values()):
        term = pagkit.PAG(2.0, heads={n: list(h) for n, h in chosen.items()}, strength=alpha)
    else:
        term = pagkit.PAG(2.0, layers=names, strength=alpha)
    guided = GuidedDenoiser(model, [term]).predict(x, t, cond)
    torch.testing.assert_close(guided, plain + 2.0 * (plain - expected), rtol=0, atol=5e-5)


def test_strength_one_on_every_head_is_plain_pag_bit_for_bit():
    model, x, t, cond = _unet()
    layers = [i.name for i in pagkit.layers(model)]
    heads = pagkit.layers(model)[0].heads
    assert all(i.heads == heads for i in pagkit.layers(model))
    assert type(pagkit.PAG(2.0, strength=1.0, heads=None).make_perturbation()) is Identity
    plain_pag = GuidedDenoiser(model, [pagkit.PAG(2.0, layers=layers)]).predict(x, t, cond)
    for term in (pagkit.PAG(2.0, layers=layers, strength=1.0, heads=None),
                 pagkit.PAG(2.0, layers=layers, heads=list(range(heads)))):  # the head-selecting path, all heads
        assert torch.equal(GuidedDenoiser(model, [term]).predict(x, t, cond), plain_pag)
    model, x, t, cond = _sd3()  # joint sites: identity follows the joint convention on the chosen heads too
    layers = [i.name for i in pagkit.layers(model)]
    plain_pag = GuidedDenoiser(model, [pagkit.PAG(2.0, layers=layers)]).predict(x, t, cond)
    every = GuidedDenoiser(model, [pagkit.PAG(2.0, layers=layers, heads=[0, 1])]).predict(x, t, cond)
    assert torch.equal(every, plain_pag)


def test_strength_zero_is_off_and_the_soft_branch_at_zero_equals_cond():
    """α = 0: A' = A, so the term is off (no branch, bit-identical to no guidance). Forced through routing, the
    α = 0 attention is exactly the model's SDPA, so the perturbed rows equal the conditional rows of the same call."""
    model, x, t, cond = _unet()
    layers = [i.name for i in pagkit.layers(model)]
    plain = GuidedDenoiser(model, []).predict(x, t, cond)
    for kw in (dict(strength=0.0), dict(strength=0.0, heads=[1])):
        denoiser = GuidedDenoiser(model, [pagkit.PAG(2.0, layers=layers, **kw)])
        assert [b.name for b in denoiser.branches(0.0)[0]] == ["cond"]
        assert torch.equal(denoiser.predict(x, t, cond), plain)
    xx = torch.cat([x, x])
    both = {k: torch.cat([v, v]) for k, v in cond.items()}
    with routed(model, layers) as router:
        router.input_hw = tuple(x.shape[-2:])
        router.plan = [Segment(2, 4, {n: SoftIdentity(0.0, (1,)) for n in layers})]
        out = _forward(model, xx, t, both)
    torch.testing.assert_close(out[2:], out[:2], rtol=0, atol=1e-6)
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    layout = pagkit.perturb.TokenLayout.self_attention(9)
    assert torch.equal(SoftIdentity(0.0, (1,)).attend(q, k, v, layout), torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_schedule_and_one_batched_forward():
    model = models.unet2d(num_class_embeds=11)
    labels = dict(class_labels=torch.tensor([1, 2]), null_class_label=10)

    def run(guidance):
        return pagkit.sample(model, models.ddim(), batch_size=2, num_inference_steps=4, guidance=guidance,
                             generator=torch.Generator().manual_seed(0), progress_bar=False, **labels)
    base = run([pagkit.CFG(2.0)])
    assert torch.equal(run([pagkit.CFG(2.0), pagkit.PAG(3.0, layers="mid", heads=[0], strength=0.5, start=0.9)]), base)
    assert not torch.equal(run([pagkit.CFG(2.0), pagkit.PAG(3.0, layers="mid", heads=[0], strength=0.5)]), base)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        GuidedDenoiser(model, [pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid", heads=[1], strength=0.5)]).predict(
            torch.randn(2, 1, 16, 16), torch.tensor(500), {"class_labels": torch.tensor([1, 2])},
            {"class_labels": torch.tensor([10, 10])})
    finally:
        handle.remove()
    assert calls == [6]  # uncond, cond, soft PAG: one call


def test_restored_after_an_exception():
    model, x, t, cond = _sd3()
    before = _forward(model, x, t, cond)
    model.proj_out.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        GuidedDenoiser(model, [pagkit.PAG(2.0, heads={"blocks.1": [0]}, strength=0.5)]).predict(x, t, cond)
    assert not any("forward" in vars(m) for m in model.modules())
    model.proj_out._forward_hooks.clear()
    assert torch.equal(_forward(model, x, t, cond), before)


def test_bad_heads_and_strength_are_clear_errors_before_sampling():
    unet = models.sd_unet()
    heads = pagkit.layers(unet)[0].heads
    with pytest.raises(ValueError, match=rf"heads \[{heads}\] out of range at site .*has {heads} heads \(valid 0–"):
        GuidedDenoiser(unet, [pagkit.PAG(2.0, layers="down", heads=[0, heads])])
    with pytest.raises(ValueError, match="out of range at site transformer_blocks.2.attn"):
        GuidedDenoiser(models.sd3(), [pagkit.PAG(2.0, heads={"blocks.1": [1], "blocks.2": [2]})])
    with pytest.raises(ValueError, match="two keys with different heads"):
        GuidedDenoiser(models.sd3(), [pagkit.PAG(2.0, heads={"blocks.1": [1], "transformer_blocks.1.attn": [0]})])
    with pytest.raises(ValueError, match="unknown layer"):
        GuidedDenoiser(models.sd3(), [pagkit.PAG(2.0, heads={"blocks.9": [0]})])
    for kw, message in [(dict(strength=1.5), r"strength .* in \[0, 1\]"), (dict(strength=-0.1), r"in \[0, 1\]"),
                        (dict(strength=float("nan")), "finite"), (dict(heads=[]), "non-empty"),
                        (dict(heads=[-1]), "ints >= 0"), (dict(heads=[0, 0]), "distinct"), (dict(heads=[True]), "ints"),
                        (dict(heads=3), "list of head indices"), (dict(heads={}), "empty dict"),
                        (dict(heads={"mid": [0]}, layers="down"), "leave layers at its default"),
                        (dict(heads=[0], perturbation="mask"), "identity perturbation only"),
                        (dict(strength=0.5, perturbation="noise"), "identity perturbation only")]:
        with pytest.raises(ValueError, match=message):
            pagkit.PAG(2.0, **kw)


def test_sana_linear_attention_heads_mix_with_v():
    """Sana's map is the normalised φ(Q)φ(K)ᵀ (row-stochastic): A' = (1 − α)A + αI gives (1 − α)·O + α·V per head."""
    from pagkit.backends.sana import attend_linear, linear_attention
    q, k, v = torch.randn(3, 2, 3, 12, 4).unbind(0)
    layout = pagkit.perturb.TokenLayout.self_attention(12, (3, 4))
    phi_q, phi_k = torch.relu(q).double(), torch.relu(k).double()
    a = phi_q @ phi_k.transpose(-1, -2)
    plain = (a / (a.sum(-1, keepdim=True) + 1e-15)) @ v.double()
    expected = plain.clone()
    expected[:, [2]] = 0.25 * plain[:, [2]] + 0.75 * v.double()[:, [2]]
    ours = attend_linear(SoftIdentity(0.75, (2,)), q, k, v, layout)
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(linear_attention(torch.relu(q), torch.relu(k), v).double(), plain, rtol=0, atol=1e-5)
