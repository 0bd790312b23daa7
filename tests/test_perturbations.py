"""What each perturbation computes, and that unperturbed rows are untouched."""
import pytest
import torch

import models
import pagkit
from pagkit.routing import Segment, routed
from pagkit.perturb import Identity, LogitNoise, QueryBlur, RandomMask, Uniform, gaussian_blur
from pagkit.routing import perturbed_call


def _forward_with_plan(model, x, t, layer_names, plan, **kwargs):
    with routed(model, layer_names) as router:
        router.input_hw = tuple(x.shape[-2:])
        router.plan = plan
        return model(x, t, **kwargs).sample


@pytest.mark.parametrize("perturbation", [Identity(), QueryBlur(2.0), Uniform(), RandomMask(0.3), LogitNoise(2.0)])
def test_unperturbed_rows_are_bit_identical_to_the_unpatched_model(perturbation):
    unet = models.unet2d()
    x, t = torch.randn(6, 1, 16, 16), torch.tensor(500)
    plain = unet(x, t).sample
    layers = pagkit.resolve_layers(unet, ["down.1", "mid", "up.0"])
    out = _forward_with_plan(unet, x, t, layers, [Segment(2, 4, {n: perturbation for n in layers})])
    assert torch.equal(out[:2], plain[:2]) and torch.equal(out[4:], plain[4:])
    assert not torch.allclose(out[2:4], plain[2:4])


def test_cross_attention_is_never_touched():
    """Only the self-attention sites are routed; no processor is replaced (so none loses its arguments)."""
    unet = models.sd_unet()
    layers = pagkit.resolve_layers(unet, ["down", "mid", "up"])
    assert all(name.endswith("attn1") for name in layers)
    before = dict(unet.attn_processors)
    modules = dict(unet.named_modules())
    with routed(unet, layers):
        assert dict(unet.attn_processors) == before
        patched = {name for name, m in unet.named_modules() if "forward" in vars(m)}
    assert patched == set(layers)
    assert not any("forward" in vars(m) for m in modules.values())


def test_seg_infinite_sigma_equals_uniform_and_tiny_sigma_equals_no_perturbation():
    unet = models.unet2d()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor(300)
    layers = pagkit.resolve_layers(unet, ["down", "mid"])

    def run(perturbation):
        return _forward_with_plan(unet, x, t, layers, [Segment(0, 2, {n: perturbation for n in layers})])

    uniform = run(Uniform())
    assert torch.equal(run(QueryBlur(float("inf"))), uniform)
    assert torch.equal(run(QueryBlur(1e5)), uniform)  # > 9999 counts as ∞, as in the official SEG code
    torch.testing.assert_close(run(QueryBlur(0.01)), unet(x, t).sample, rtol=0, atol=1e-5)
    assert (run(QueryBlur(1.0)) - unet(x, t).sample).abs().max() > 1e-3


def test_query_blur_uses_the_real_non_square_grid():
    attn = models.unet2d().mid_block.attentions[0]
    h, w = 4, 6
    x = torch.randn(1, 32, h, w)
    ours = perturbed_call(attn, x, QueryBlur(1.0))
    # reference: blur Q as an image of the true 4×6 grid, then attend
    tokens = attn.group_norm(x.flatten(2)).transpose(1, 2)
    q = attn.to_q(tokens).view(1, h * w, attn.heads, -1).transpose(1, 2)
    k = attn.to_k(tokens).view(1, h * w, attn.heads, -1).transpose(1, 2)
    v = attn.to_v(tokens).view(1, h * w, attn.heads, -1).transpose(1, 2)
    q_img = q.permute(0, 1, 3, 2).reshape(1, -1, h, w)
    q = gaussian_blur(q_img, 1.0).reshape(1, attn.heads, -1, h * w).permute(0, 1, 3, 2)
    out = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
    out = attn.to_out[0](out.transpose(1, 2).reshape(1, h * w, -1)).transpose(1, 2).reshape(1, 32, h, w)
    torch.testing.assert_close(ours, (out + x) / attn.rescale_output_factor, rtol=0, atol=1e-5)
    # and a whole non-square sample runs through a UNet with SEG on every layer
    unet = models.unet2d()
    y = pagkit.sample(unet, models.ddim(), num_inference_steps=2, height=16, width=24, progress_bar=False,
                      guidance=[pagkit.SEG(2.0, sigma=2.0, layers=["down", "mid", "up"])])
    assert y.shape == (1, 1, 16, 24) and torch.isfinite(y).all()


def test_3d_token_layers_read_their_grid_from_the_model_input():
    """attn1 of a transformer block sees (B, N, C) tokens; the router supplies H×W for the blur."""
    unet = models.sd_unet()
    x, t, emb = torch.randn(1, 4, 16, 24), torch.tensor(10), torch.randn(1, 7, 24)
    layer = pagkit.resolve_layers(unet, "mid")
    out = _forward_with_plan(unet, x, t, layer, [Segment(0, 1, {layer[0]: QueryBlur(1.0)})],
                             encoder_hidden_states=emb)
    assert out.shape == x.shape
    with routed(unet, layer) as router:
        router.input_hw = (16, 24)
        assert router.grid(layer[0]) == (8, 12)


def test_random_ablations_are_seeded_and_keep_rows_non_empty():
    attn = models.unet2d().mid_block.attentions[0]
    x = torch.randn(2, 32, 4, 4)
    a = perturbed_call(attn, x, RandomMask(0.99, seed=3))
    b = perturbed_call(attn, x, RandomMask(0.99, seed=3))
    assert torch.equal(a, b) and torch.isfinite(a).all()  # diagonal kept: no all-masked row, no NaN
    noisy = perturbed_call(attn, x, LogitNoise(0.0))
    plain = models.unet2d().mid_block.attentions[0](x)
    torch.testing.assert_close(noisy, plain, rtol=0, atol=1e-5)
