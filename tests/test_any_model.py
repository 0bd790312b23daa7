"""Any PyTorch model: a timm-style DiT (SDPA inside its attention) and an ADM UNet block (einsum QKVAttention),
both written here, through pagkit.adapt — against references written here too."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import pagkit
from pagkit.denoise import GuidedDenoiser


class TimmAttention(nn.Module):
    """timm's ``Attention``: fused qkv, SDPA, proj. ``identity=True`` is the test's reference PAG (output = V)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.identity = False

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = v if self.identity else F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TinyDiT(nn.Module):
    """Patchify, blocks of (attention, MLP) with a timestep-and-class shift, unpatchify; predicts ε and σ (2C)."""

    def __init__(self, channels=3, dim=32, depth=4, heads=4, patch=2, classes=10):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cond = nn.Embedding(classes + 1, dim)
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(norm=nn.LayerNorm(dim), attn=TimmAttention(dim, heads),
                                                       mlp=nn.Linear(dim, dim))) for _ in range(depth))
        self.out = nn.Linear(dim, 2 * channels * patch * patch)

    def forward(self, x, t, y):
        b, _, h, w = x.shape
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        shift = (self.cond(y) + self.time(t.float().view(-1, 1).expand(b, 1) / 1000))[:, None]
        for block in self.blocks:
            tokens = tokens + block["attn"](block["norm"](tokens + shift))
            tokens = tokens + torch.tanh(block["mlp"](tokens))
        p = self.patch
        out = self.out(tokens).view(b, h // p, w // p, 2 * self.channels, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(b, 2 * self.channels, h, w)


class QKVAttention(nn.Module):
    """guided-diffusion's QKVAttention (einsum, softmax), inside its AttentionBlock: norm, qkv conv, proj, residual."""

    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1)).reshape(b * self.heads, 3 * c // self.heads, -1)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(c // self.heads))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
        return x + self.proj(a).reshape(b, c, h, w)


def qkv_adapter(module, x):
    """The whole adapter for ADM's QKVAttention: its q, k, v, and how to finish the block."""
    b, c, h, w = x.shape
    qkv = module.qkv(module.norm(x).reshape(b, c, -1)).reshape(b, module.heads, 3 * c // module.heads, -1)
    q, k, v = (t.transpose(-1, -2) for t in qkv.chunk(3, dim=2))  # (b, heads, tokens, dim)

    def finish(out):
        return x + module.proj(out.transpose(-1, -2).reshape(b, c, -1)).reshape(b, c, h, w)
    return q, k, v, finish


class TinyADM(nn.Module):
    def __init__(self, channels=3, width=16):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.attn = QKVAttention(width, heads=2)
        self.attn2 = QKVAttention(width, heads=2)
        self.out = nn.Conv2d(width, 2 * channels, 3, padding=1)

    def forward(self, x, timesteps):
        h = self.inp(x) + self.time(timesteps.float().view(-1, 1).expand(x.shape[0], 1) / 1000)[:, :, None, None]
        return self.out(self.attn2(torch.tanh(self.attn(h))))


def _dit():
    torch.manual_seed(0)
    return pagkit.adapt(TinyDiT().eval(), sites="blocks.*.attn", patch_size=2, learned_sigma=True,
                        call=lambda forward, x, t, cond: forward(x, t, **cond), shape=(3, 8, 8))


def _adm():
    torch.manual_seed(0)
    return pagkit.adapt(TinyADM().eval(), sites=["attn", "attn2"], attention=qkv_adapter, learned_sigma=True,
                        call=lambda forward, x, t, cond: forward(x, t), shape=(3, 8, 8))


def _inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 8, 8, generator=g), torch.tensor([300] * batch)


def test_sites_are_the_named_modules():
    assert [i.name for i in pagkit.layers(_dit())] == [f"blocks.{i}.attn" for i in range(4)]
    assert pagkit.resolve_layers(_dit(), "blocks.2") == ["blocks.2.attn"]
    assert [i.name for i in pagkit.layers(_adm())] == ["attn", "attn2"]
    with pytest.raises(ValueError, match="no module of TinyDiT matches"):
        pagkit.adapt(TinyDiT(), sites="blocks.*.attention")


def test_dit_pag_equals_the_identity_reference_and_cfg_batch_equals_separate_calls():
    model = _dit()
    x, t = _inputs()
    y, null = dict(y=torch.tensor([1, 2])), dict(y=torch.tensor([10, 10]))
    terms = [pagkit.CFG(3.0), pagkit.PAG(2.0, layers="blocks.2.attn")]
    guided = GuidedDenoiser(model, terms).predict(x, t, y, null)
    with torch.no_grad():
        eps_c, eps_u = model(x, t, **y)[:, :3], model(x, t, **null)[:, :3]
        model.blocks[2]["attn"].identity = True
        eps_p = model(x, t, **y)[:, :3]
        model.blocks[2]["attn"].identity = False
    expected = eps_u + 3.0 * (eps_c - eps_u) + 2.0 * (eps_c - eps_p)
    torch.testing.assert_close(guided[:, :3], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(guided[:, 3:], model(x, t, **y)[:, 3:], rtol=0, atol=0)  # σ channels: cond's


@pytest.mark.parametrize("build", [_dit, _adm])
def test_neutral_scale_is_bit_identical_and_the_model_is_restored(build):
    model = build()
    x, t = _inputs()
    cond = dict(y=torch.tensor([1, 2])) if build is _dit else {}
    plain = model(x, t, **cond)
    assert torch.equal(GuidedDenoiser(model, [pagkit.PAG(0.0, layers=pagkit.layers(model)[0].name)])
                       .predict(x, t, cond), plain)
    from pagkit.routing import Segment, routed
    with pytest.raises(KeyError):
        with routed(model, [i.name for i in pagkit.layers(model)]) as router:
            router.plan = [Segment(0, 2, {i.name: pagkit.PAG(1.0).make_perturbation()
                                          for i in pagkit.layers(model)})]
            raise KeyError("boom")
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(model(x, t, **cond), plain)


def test_adm_adapter_pag_equals_the_identity_reference_on_the_perturbed_rows_only():
    model = _adm()
    x, t = _inputs(batch=3)
    from pagkit.routing import Segment, routed
    from pagkit.perturb import Identity
    with routed(model, ["attn2"]) as router:
        router.plan = [Segment(1, 2, {"attn2": Identity()})]
        out = model(x, t)
    plain = model(x, t)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2], plain[2])
    # reference: the block with softmax(QKᵀ) = I, i.e. proj(V) + x, written out here
    attn2 = model.attn2
    with torch.no_grad():
        h = torch.tanh(model.attn(model.inp(x[1:2]) + model.time(t[1:2].float().view(-1, 1) / 1000)[:, :, None, None]))
        b, c, hh, ww = h.shape
        v = attn2.qkv(attn2.norm(h).reshape(b, c, -1)).reshape(b, attn2.heads, 3 * c // attn2.heads, -1)[:, :, -c // attn2.heads:]
        expected = model.out(h + attn2.proj(v.reshape(b, c, -1)).reshape(b, c, hh, ww))
    torch.testing.assert_close(out[1:2], expected, rtol=0, atol=1e-5)
    # and the guided sampler runs on it with CFG-free PAG + SEG, learned σ handled
    images = pagkit.sample(model, models.ddim(), batch_size=2, num_inference_steps=3, progress_bar=False,
                           guidance=[pagkit.PAG(1.0, layers="attn2"), pagkit.SEG(1.0, sigma=1.0, layers="attn")],
                           generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_bad_adapters_and_sites_without_attention_fail_clearly():
    x, t = _inputs()
    flat = lambda m, x: (x.flatten(2),) * 3 + (lambda o: o,)  # noqa: E731 (no heads axis: a common slip)
    bad = pagkit.adapt(TinyADM().eval(), sites="attn", attention=flat,
                       call=lambda f, x, t, c: f(x, t))
    with pytest.raises(ValueError, match="must return q, k, v of shape"):
        GuidedDenoiser(bad, [pagkit.PAG(1.0, layers="attn")]).predict(x, t, {})
    silent = pagkit.adapt(TinyADM().eval(), sites="inp", call=lambda f, x, t, c: f(x, t))  # a conv: no attention
    with pytest.raises(RuntimeError, match="nothing was perturbed"):
        GuidedDenoiser(silent, [pagkit.PAG(1.0, layers="inp")]).predict(x, t, {})
