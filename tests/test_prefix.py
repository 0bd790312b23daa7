"""Prefix sharing computes the same thing as running every branch in full, with fewer rows in the prefix."""
import warnings

import pytest
import torch

import models
import pagkit
from pagkit.denoise import GuidedDenoiser
from pagkit.prefix import prefix_stages


def _compare(model, x, t, cond, uncond, selection):
    terms = ([pagkit.CFG(3.0)] if uncond else []) + [pagkit.PAG(2.0, layers=selection),
                                                     pagkit.SEG(1.0, sigma=2.0, layers=selection)]
    shared = GuidedDenoiser(model, terms).predict(x, t, cond, uncond)
    full = GuidedDenoiser(model, terms, prefix_sharing=False).predict(x, t, cond, uncond)
    plain = GuidedDenoiser(model, terms[:1] if uncond else []).predict(x, t, cond, uncond)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    assert (shared - plain).abs().max() > 1e-4  # the perturbed branches did change the result


@pytest.mark.parametrize("selection", ["down.2", "mid", "up.1"])
def test_unet2d(selection):
    model = models.unet2d(num_class_embeds=11)
    _compare(model, torch.randn(2, 1, 16, 16), torch.tensor(300), {"class_labels": torch.tensor([1, 2])},
             {"class_labels": torch.tensor([10, 10])}, selection)


@pytest.mark.parametrize("selection", ["down", "mid", "up.1"])
def test_unet2d_condition_with_controlnet_residuals(selection):
    unet = models.sd_unet()
    net = models.controlnet(unet)
    x, t, emb = torch.randn(2, 4, 16, 16), torch.tensor(300), torch.randn(2, 7, 24)
    image = torch.rand(2, 3, 32, 32)
    down, mid = net(x, t, emb, controlnet_cond=image, return_dict=False)
    down_u, mid_u = net(x, t, torch.zeros_like(emb), controlnet_cond=image, return_dict=False)
    cond = {"encoder_hidden_states": emb, "down_block_additional_residuals": down,
            "mid_block_additional_residual": mid}
    uncond = {"encoder_hidden_states": torch.zeros_like(emb), "down_block_additional_residuals": down_u,
              "mid_block_additional_residual": mid_u}
    _compare(unet, x, t, cond, uncond, selection)


@pytest.mark.parametrize("selection", ["down.1", "mid", "up.0"])
def test_sdxl_added_conditions(selection):
    unet = models.sdxl_unet()
    x, t = torch.randn(1, 4, 16, 16), torch.tensor(300)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return {"encoder_hidden_states": torch.randn(1, 7, 24, generator=g),
                "added_cond_kwargs": {"text_embeds": torch.randn(1, 24, generator=g),
                                      "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}}
    _compare(unet, x, t, inputs(0), inputs(1), selection)


@pytest.mark.parametrize("selection", ["blocks.0", "blocks.5", "blocks.11"])
def test_dit(selection):
    _compare(models.dit(), torch.randn(2, 4, 8, 8), torch.tensor([300, 300]),
             {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([0, 0])}, selection)


@pytest.mark.parametrize("selection", ["blocks.0", "blocks.2"])
def test_pixart(selection):
    g = torch.Generator().manual_seed(0)
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    _compare(models.pixart(), torch.randn(2, 4, 8, 8), torch.tensor([300, 300]),
             {"encoder_hidden_states": torch.randn(2, 5, 24, generator=g), **extra},
             {"encoder_hidden_states": torch.zeros(2, 5, 24), **extra}, selection)


def test_prefix_really_runs_on_fewer_rows():
    model = models.unet2d()
    rows = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda m, a, n=name: rows.__setitem__(n, a[0].shape[0]))  # inner modules see what the stage computes
        for name in ("down_blocks.0.resnets.0", "mid_block.resnets.0", "conv_out")]
    GuidedDenoiser(model, [pagkit.PAG(2.0, layers="mid")]).predict(torch.randn(3, 1, 16, 16), torch.tensor(5))
    for h in hooks:
        h.remove()
    assert rows == {"down_blocks.0.resnets.0": 3, "mid_block.resnets.0": 6, "conv_out": 6}  # cond only in the prefix, cond + PAG after
    assert prefix_stages(model, ["up_blocks.0.attentions.0"]) == ["conv_in", "down_blocks.0", "down_blocks.1",
                                                                  "down_blocks.2", "mid_block"]


def test_unknown_layouts_fall_back_and_say_so_once():
    class Wrapper(torch.nn.Module):  # a user's own model around a diffusers UNet
        def __init__(self):
            super().__init__()
            self.inner = models.unet2d()

        def forward(self, x, timestep, return_dict=False):
            return self.inner(x, timestep, return_dict=return_dict)

    model = Wrapper()
    denoiser = GuidedDenoiser(model, [pagkit.PAG(2.0, layers="inner.mid_block.attentions.0")])
    with pytest.warns(UserWarning, match="prefix sharing does not know the layout of Wrapper"):
        shared = denoiser.predict(torch.randn(1, 1, 16, 16), torch.tensor(5))
    x = torch.randn(1, 1, 16, 16)
    with warnings.catch_warnings(record=True) as record:  # the same warning does not come twice
        warnings.simplefilter("always")
        denoiser.predict(x, torch.tensor(5))
    assert not [w for w in record if "prefix sharing" in str(w.message)]
    full = GuidedDenoiser(model, denoiser.terms, prefix_sharing=False).predict(x, torch.tensor(5))
    assert torch.equal(denoiser.predict(x, torch.tensor(5)), full)
