"""Low precision (issue 19, item 3): ``pagkit.sample`` and every perturbation in bfloat16 on CPU against float32.

Tolerances, stated: a tiny UNet's ε is of size ≈ 3, and bfloat16 keeps 8 bits of mantissa (relative 2⁻⁸ ≈ 0.4 %),
so one bf16 prediction is off by ≈ 0.01–0.03 from the fp32 one (plain CFG's own error here is 0.025). A guidance
term's contribution (ε̃ − ε̃_CFG) in bf16 must be within 0.04 (max abs) of the fp32 one, and a whole 4-step sample
within 0.05 (mean abs; the issue measured 0.017 on the shipped UNet). Blur kernels and SAG's attention-received map
are computed in float32; the model is never upcast (its parameters stay bf16, its outputs are bf16).
"""
import copy

import pytest
import torch

import models
import pagkit
from pagkit.denoise import GuidedDenoiser
from pagkit.perturb import QueryBlur, gaussian_blur, gaussian_blur_video
from pagkit.routing import _attention_received

TERMS = {
    "identity": lambda: pagkit.PAG(1.0, layers="*"),
    "uniform": lambda: pagkit.PAG(1.0, layers="*", perturbation="uniform"),
    "mask": lambda: pagkit.PAG(1.0, layers="*", perturbation="mask"),
    "noise": lambda: pagkit.PAG(1.0, layers="*", perturbation="noise", noise_std=3.0),
    "soft-heads": lambda: pagkit.PAG(1.0, layers="*", heads=[0], strength=0.5),
    "seg-blur": lambda: pagkit.SEG(1.0, sigma=2.0, layers="*"),
    "seg-inf": lambda: pagkit.SEG(1.0, layers="*"),
    "sag": lambda: pagkit.SAG(1.0, layer="mid"),
    "slg": lambda: pagkit.SLG(1.0, layers="*", start=0.0, stop=1.0),
    "tpg": lambda: pagkit.TPG(1.0, layers="*"),
    "pag-cached": lambda: pagkit.PAG(1.0, layers="*", cache=2),
}
C, U = {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([10, 10])}


@pytest.fixture(scope="module")
def pair():
    m32 = models.unet2d(num_class_embeds=11)
    return m32, copy.deepcopy(m32).to(torch.bfloat16)


def _contribution(model, term):
    dtype = next(model.parameters()).dtype
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    t = torch.tensor(500)
    scheduler = models.ddim() if isinstance(term, pagkit.SAG) else None
    with torch.no_grad():
        guided = GuidedDenoiser(model, [pagkit.CFG(2.0), term], scheduler=scheduler).predict(x, t, C, U, progress=0.5)
        cfg = GuidedDenoiser(model, [pagkit.CFG(2.0)]).predict(x, t, C, U, progress=0.5)
    assert guided.dtype == dtype
    return guided.float() - cfg.float()


@pytest.mark.parametrize("name", list(TERMS))
def test_every_perturbation_in_bf16_matches_fp32(pair, name):
    m32, m16 = pair
    full, half = _contribution(m32, TERMS[name]()), _contribution(m16, TERMS[name]())
    assert full.abs().max() > 0.03  # the term does something measurable at fp32
    assert (half - full).abs().max() <= 0.04
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())


def test_sample_in_bf16_matches_fp32_and_does_not_upcast(pair):
    m32, m16 = pair
    latents = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))

    def run(model, guidance):
        dtype = next(model.parameters()).dtype
        return pagkit.sample(model, models.ddim(), batch_size=2, num_inference_steps=4, guidance=guidance,
                             class_labels=torch.tensor([1, 2]), null_class_label=10, latents=latents.to(dtype),
                             progress_bar=False)

    for guidance in ([pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid")], [pagkit.CFG(2.0), pagkit.SEG(1.0, sigma=2.0)],
                     [pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid", fold=True)]):
        half = run(m16, guidance)
        assert half.dtype == torch.bfloat16
        assert (half.float() - run(m32, guidance)).abs().mean() <= 0.05
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert all(b.dtype == torch.bfloat16 for b in m16.buffers() if b.is_floating_point())


def test_sd_unet_text_conditioned_pag_in_bf16():
    m32 = models.sd_unet()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    text, null = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1)), torch.zeros(2, 7, 24)
    out = {}
    for name, m in (("fp32", m32), ("bf16", m16)):
        dtype = next(m.parameters()).dtype
        out[name] = pagkit.sample(m, models.ddim(), batch_size=2, num_inference_steps=3,
                                  guidance=[pagkit.CFG(3.0), pagkit.PAG(1.0, layers="*")],
                                  encoder_hidden_states=text.to(dtype), negative_encoder_hidden_states=null.to(dtype),
                                  latents=torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype),
                                  progress_bar=False)
    assert out["bf16"].dtype == torch.bfloat16
    assert (out["bf16"].float() - out["fp32"]).abs().mean() <= 0.05


def test_blur_is_computed_in_float32_for_half_inputs():
    img = torch.randn(2, 8, 7, 9, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, torch.float16):
        low = img.to(dtype)
        blurred = gaussian_blur(low, 1.5)
        assert blurred.dtype == dtype
        assert torch.equal(blurred, gaussian_blur(low.float(), 1.5).to(dtype))
        video = low.view(2, 8, 1, 7, 9).expand(2, 8, 3, 7, 9)
        assert torch.equal(gaussian_blur_video(video, 1.5), gaussian_blur_video(video.float(), 1.5).to(dtype))
    # SEG's query blur of bf16 queries: the float32 blur of the same queries, rounded once; σ = ∞ the mean query
    q = torch.randn(1, 2, 49, 4, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    blurred = QueryBlur(sigma=1.0).blur_queries(q, (7, 7))
    assert blurred.dtype == torch.bfloat16
    assert torch.equal(blurred, QueryBlur(sigma=1.0).blur_queries(q.float(), (7, 7)).to(torch.bfloat16))
    mean = QueryBlur(sigma=float("inf")).blur_queries(q, (7, 7))
    torch.testing.assert_close(mean.float(), q.float().mean(dim=2, keepdim=True).expand_as(q), rtol=0, atol=2e-2)


def test_attention_received_is_float32_and_exact_for_bf16_queries():
    q = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    k = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    received = _attention_received(q, k, None, None)
    assert received.dtype == torch.float32
    reference = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8 ** 0.5, dim=-1).mean(1).sum(1)
    torch.testing.assert_close(received.double(), reference, rtol=0, atol=1e-5)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    mask[..., -4:] = False
    masked = _attention_received(q, k, mask, None)
    assert masked.dtype == torch.float32 and torch.all(masked[:, -4:] == 0)
