"""Every video family through the same invariants, against references written here.

As in test_joint_families: the references compute attention explicitly, softmax(QKᵀ/√d + M)·V, at the point
where the model's own processor would call attention (so QK-norm and RoPE are the model's own). SEG's blur is
written here as a dense matrix, the Kronecker product of one reflect-padded 1-D Gaussian per axis of the F×H×W
grid (the identity along F for ``per_frame``), applied to the image queries.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models import attention_processor
from diffusers.models.transformers import (transformer_hunyuan_video, transformer_hunyuan_video15, transformer_ltx,
                                          transformer_ltx2, transformer_wan)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import video_models as V  # noqa: E402
from contract.reference import patch_attention  # noqa: E402

import pagkit  # noqa: E402
import pagkit.prefix  # noqa: E402
from pagkit.backends import SITE_KINDS  # noqa: E402
from pagkit.denoise import GuidedDenoiser  # noqa: E402
from pagkit.perturb import Identity, QueryBlur, Uniform  # noqa: E402
from pagkit.routing import Router, Segment, routed  # noqa: E402

# per family: builder, inputs, the token grid F×H×W of those inputs, the kinds of its sites, where the image tokens
# sit in a joint/single sequence (read off the processors; None: self-attention only), modules that hold attention
# but must not be sites, and the diffusers modules whose attention call the reference replaces; ``audio``: the
# sites over LTX-2's audio tokens (self-attention along time, grid T_a × 1 × 1)
FAMILIES = {
    "wan": dict(build=V.wan, inputs=V.wan_inputs, grid=(3, 4, 6), kinds={"spatiotemporal"}, image_first=None,
                not_sites=["blocks.0.attn2", "blocks.1.attn2"], dispatch=[transformer_wan], functional=[]),
    "cogvideox": dict(build=V.cogvideox, inputs=V.cogvideox_inputs, grid=(3, 4, 6), kinds={"joint"},
                      image_first=False, not_sites=[], dispatch=[], functional=[attention_processor]),
    "cogvideox1.5": dict(build=V.cogvideox15, inputs=V.cogvideox15_inputs, grid=(3, 4, 6), kinds={"joint"},
                         image_first=False, not_sites=[], dispatch=[], functional=[attention_processor]),
    "hunyuan_video": dict(build=V.hunyuan_video, inputs=V.hunyuan_video_inputs, grid=(3, 4, 6),
                          kinds={"joint", "single"}, image_first=True,
                          not_sites=["context_embedder.token_refiner.refiner_blocks.0.attn"],
                          dispatch=[transformer_hunyuan_video], functional=[attention_processor]),
    "ltx": dict(build=V.ltx, inputs=V.ltx_inputs, grid=(3, 4, 6), kinds={"spatiotemporal"}, image_first=None,
                not_sites=["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"], dispatch=[transformer_ltx],
                functional=[]),
    "hunyuan_video15": dict(build=V.hunyuan_video15, inputs=V.hunyuan_video15_inputs, grid=(3, 4, 6), kinds={"joint"},
                            image_first=True, not_sites=["context_embedder.token_refiner.refiner_blocks.0.attn"],
                            dispatch=[transformer_hunyuan_video15], functional=[]),
    "ltx2": dict(build=V.ltx2, inputs=V.ltx2_inputs, grid=(3, 4, 6), kinds={"spatiotemporal", "temporal"},
                 image_first=None, audio=".audio_attn1",
                 not_sites=[f"transformer_blocks.{i}.{n}" for i in (0, 1) for n in
                            ("attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")],
                 dispatch=[transformer_ltx2], functional=[]),
    "mochi": dict(build=V.mochi, inputs=V.mochi_inputs, grid=(3, 4, 6), kinds={"joint"}, image_first=True,
                  not_sites=[], dispatch=[], functional=[attention_processor]),
}

SIGMA = 1.0  # kernel ceil(6σ)+1 = 7, clamped to 3 along F and H and 5 along W of the 3 × 4 × 6 grid
PERTURBATIONS = {"identity": Identity(), "strict": Identity(strict=True), "uniform": Uniform(),
                 "uniform_frame": QueryBlur(float("inf"), per_frame=True), "blur": QueryBlur(SIGMA),
                 "blur_frame": QueryBlur(SIGMA, per_frame=True)}


def blur_matrix_1d(length, sigma):
    """out = M @ x: a Gaussian of ceil(6σ)+1 taps (odd, at most the largest odd ≤ length) with reflect padding."""
    k = math.ceil(6 * sigma) + 1
    k = k if k % 2 else k - 1
    k = min(k, length if length % 2 else length - 1)
    m = torch.zeros(length, length, dtype=torch.float64)
    if k <= 1:
        return m + torch.eye(length, dtype=torch.float64)
    half = k // 2
    taps = torch.tensor([math.exp(-0.5 * ((j - half) / sigma) ** 2) for j in range(k)], dtype=torch.float64)
    taps = taps / taps.sum()
    for i in range(length):
        for j in range(k):
            src = i + j - half
            src = -src if src < 0 else (2 * (length - 1) - src if src >= length else src)
            m[i, src] += taps[j]
    return m


def blur_matrix(grid, sigma, per_frame):
    f, h, w = grid
    frames = torch.eye(f, dtype=torch.float64) if per_frame else blur_matrix_1d(f, sigma)
    return torch.kron(frames, torch.kron(blur_matrix_1d(h, sigma), blur_matrix_1d(w, sigma)))


def explicit_attention(q, k, v, image, grid, mode, attn_mask=None, scale=None, enable_gqa=False, **_):
    """(B, H, S, d) → (B, H, S, d); ``image`` = (start, stop) of the video tokens, ``grid`` their F×H×W."""
    a, b = image
    assert b - a == math.prod(grid)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    mask = torch.zeros(q.shape[-2], k.shape[-2])
    if attn_mask is not None:  # the model's own mask (bool: True = attend), kept on every query
        mask = mask + (torch.zeros(attn_mask.shape).masked_fill(~attn_mask, float("-inf"))
                       if attn_mask.dtype == torch.bool else attn_mask)
    q = q.clone()
    qi = q[:, :, a:b]
    if mode == "identity":
        block = torch.full((b - a, b - a), float("-inf"))
        block.fill_diagonal_(0.0)
        mask = mask.expand(*q.shape[:2], *mask.shape[-2:]).clone() if mask.ndim < 4 else mask.clone()
        mask[..., a:b, a:b] = mask[..., a:b, a:b] + block
    elif mode == "uniform":
        q[:, :, a:b] = qi.mean(dim=2, keepdim=True)
    elif mode == "uniform_frame":
        per = (b - a) // grid[0]  # tokens of one frame
        q[:, :, a:b] = qi.unflatten(2, (grid[0], per)).mean(dim=3).repeat_interleave(per, dim=2)
    elif mode in ("blur", "blur_frame"):
        q[:, :, a:b] = (blur_matrix(grid, SIGMA, mode == "blur_frame") @ qi.double()).to(q.dtype)
    # a query that may attend to nothing (HunyuanVideo 1.5's context padding) gets 0, as SDPA returns
    out = torch.softmax(q @ k.transpose(-1, -2) * s + mask, dim=-1).nan_to_num(0.0) @ v
    if mode == "strict":
        out[:, :, a:b] = v[:, :, a:b]
    return out


def _image_of(family, model):
    """Where the video tokens are in a site's sequence, from this file's own knowledge of the family."""
    spec = FAMILIES[family]
    kinds = {i.name: i.kind for i in pagkit.layers(model)}
    n = math.prod(spec["grid"])

    def image_of(name, seq_len):
        if "audio" in spec and name.endswith(spec["audio"]):
            return (0, seq_len), (seq_len, 1, 1)
        if kinds[name] == "spatiotemporal":
            assert seq_len == n
            return (0, n), spec["grid"]
        return ((0, n) if spec["image_first"] else (seq_len - n, seq_len)), spec["grid"]
    return image_of


def _site_sets(model):
    kinds = {}
    for info in pagkit.layers(model):
        kinds.setdefault(info.kind, []).append(info.name)
    return [names[:1] for names in kinds.values()] + [[i.name for i in pagkit.layers(model)]]


def _call(model, x, t, cond):
    return model(x, timestep=t, **cond, return_dict=False)[0]


def _routed_call(model, names, perturbation, x, t, cond, rows=None):
    backend = GuidedDenoiser(model, []).backend
    with routed(model, names) as router:
        router.info = backend.forward_info(model, x, cond)
        router.batch = x.shape[0]
        a, b = rows or (0, x.shape[0])
        router.plan = [Segment(a, b, {n: perturbation for n in names})]
        return _call(model, x, t, cond)


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_kinds_grid_and_what_is_never_a_site(family):
    spec = FAMILIES[family]
    model = spec["build"]()
    infos = pagkit.layers(model)
    assert {i.kind for i in infos} == spec["kinds"] and spec["kinds"] <= set(SITE_KINDS)
    backend_sites = GuidedDenoiser(model, []).backend.sites(model)
    assert {s.image_first for s in backend_sites if s.kind in ("joint", "single")} <= {spec["image_first"]}
    for name in spec["not_sites"]:
        assert name in dict(model.named_modules()) and name not in {i.name for i in infos}, name
        with pytest.raises(ValueError, match="not a perturbable site|cross-attention"):
            pagkit.resolve_layers(model, name)
    x, t, cond = spec["inputs"]()
    backend = GuidedDenoiser(model, []).backend
    info = backend.forward_info(model, x, cond)
    for site in backend_sites:
        grid = backend.layout(site, math.prod(spec["grid"]) + 64, info).grid
        audio = "audio" in spec and site.name.endswith(spec["audio"])
        assert grid == ((math.prod(spec["grid"]) + 64, 1, 1) if audio else spec["grid"]), site.name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", PERTURBATIONS)
def test_perturbed_branch_equals_the_explicit_reference(family, mode, monkeypatch):
    spec = FAMILIES[family]
    model = spec["build"]()
    x, t, cond = spec["inputs"]()
    plain = _call(model, x, t, cond)
    for names in _site_sets(model):
        ours = _routed_call(model, names, PERTURBATIONS[mode], x, t, cond)
        with monkeypatch.context() as m:
            image_of = _image_of(family, model)
            patch_attention(m, model, names, lambda name, q, k, v, **kw: explicit_attention(
                q, k, v, *image_of(name, q.shape[-2]), mode, **kw), spec["functional"], spec["dispatch"])
            expected = _call(model, x, t, cond)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
        if mode.endswith("_frame") and all(n.endswith(spec.get("audio", "-")) for n in names):
            continue  # per frame, a T_a × 1 × 1 audio grid has one token a frame: nothing to blur or average
        assert (ours - plain).abs().max() > 1e-3, names  # the perturbation changed something


@pytest.mark.parametrize("family", FAMILIES)
def test_neutral_scale_and_untouched_rows_are_bit_identical(family):
    spec = FAMILIES[family]
    model = spec["build"]()
    x, t, cond = spec["inputs"](batch=3)
    plain = _call(model, x, t, cond)
    names = [i.name for i in pagkit.layers(model)]
    neutral = GuidedDenoiser(model, [pagkit.PAG(0.0, layers=names)]).predict(x, t, cond)
    assert torch.equal(neutral, plain)
    out = _routed_call(model, names, Identity(), x, t, cond, rows=(1, 2))
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2], plain[2])
    assert not torch.allclose(out[1], plain[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_sharing_is_exact_and_batched_equals_separate(family):
    spec = FAMILIES[family]
    model = spec["build"]()
    x, t, cond = spec["inputs"]()
    assert GuidedDenoiser(model, []).backend.stages(model)  # the blocks form a list
    last = pagkit.layers(model)[-1].name
    terms = [pagkit.PAG(2.0, layers=last), pagkit.SEG(1.5, sigma=SIGMA, layers=last, per_frame=True)]
    shared = GuidedDenoiser(model, terms).predict(x, t, cond)
    full = GuidedDenoiser(model, terms, prefix_sharing=False).predict(x, t, cond)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    eps = _call(model, x, t, cond)
    separate = eps + 2.0 * (eps - _routed_call(model, [last], Identity(), x, t, cond)) \
        + 1.5 * (eps - _routed_call(model, [last], QueryBlur(SIGMA, per_frame=True), x, t, cond))
    torch.testing.assert_close(full, separate, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_is_restored_after_an_exception(family):
    spec = FAMILIES[family]
    model = spec["build"]()
    x, t, cond = spec["inputs"]()
    before = _call(model, x, t, cond)
    names = [i.name for i in pagkit.layers(model)]
    with pytest.raises(KeyError):
        with routed(model, names) as router:
            router.plan = [Segment(0, 2, {n: Identity() for n in names})]
            raise KeyError("boom")
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(_call(model, x, t, cond), before)


def test_blur_matrix_reference_is_a_gaussian_that_keeps_the_mean():
    m = blur_matrix((3, 4, 6), SIGMA, per_frame=False)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(72, dtype=torch.float64))
    assert torch.equal(blur_matrix((3, 4, 6), SIGMA, per_frame=True)[:24, 24:], torch.zeros(24, 48,
                                                                                            dtype=torch.float64))


def test_layers_command_lists_video_sites_with_their_f_h_w_grid(tmp_path, capsys):
    from pagkit.cli import main
    model = V.cogvideox()
    model.save_pretrained(tmp_path)
    assert main(["layers", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 attention sites (2 joint)" in out and "transformer_blocks.1.attn1" in out
    assert "3x4x6" in out  # sample_frames 9 → 3 latent frames; 8 × 12 latents ÷ patch 2
    wan = V.wan()  # a tuple patch_size; no configured sample size, so no grid to print
    assert [(i.name, i.kind, i.downsampling) for i in pagkit.layers(wan)] == \
        [("blocks.0.attn1", "spatiotemporal", 2), ("blocks.1.attn1", "spatiotemporal", 2)]


def test_seg_per_frame_is_the_guidance_option_and_blurs_within_frames_only():
    assert pagkit.SEG(2.0, sigma=SIGMA, per_frame=True).make_perturbation() == QueryBlur(SIGMA, per_frame=True)
    q = torch.randn(1, 1, 72, 4)
    ours = QueryBlur(SIGMA, per_frame=True).blur_queries(q, (3, 4, 6))
    frame_by_frame = torch.cat([QueryBlur(SIGMA).blur_queries(q[:, :, i * 24:(i + 1) * 24], (4, 6))
                                for i in range(3)], dim=2)
    assert torch.equal(ours, frame_by_frame)  # each frame exactly as the 2-D blur of that frame
    torch.testing.assert_close(QueryBlur(SIGMA).blur_queries(q, (3, 4, 6)),
                               (blur_matrix((3, 4, 6), SIGMA, False) @ q.double()).float())
    with pytest.raises(ValueError, match="video token grid 3x4x5 does not hold the 72 tokens"):
        QueryBlur(SIGMA).blur_queries(q, (3, 4, 5))


def test_attention_rows_map_the_plan_onto_folded_attention_rows():
    """A family that folds frames into the attention batch (batch × frames rows, batch-major) maps the plan's model
    rows onto them through Backend.attention_rows; routing perturbs exactly the folded rows of the planned samples."""
    from diffusers.models.attention_processor import Attention
    from pagkit.backends import Backend, ForwardInfo, Site

    class Folded(Backend):
        def attention_rows(self, site, call, attention_batch, model_batch):
            return torch.arange(attention_batch) // (attention_batch // model_batch)

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    x = torch.randn(3 * 4, 6, 16)  # 3 samples × 4 frames, 6 tokens a frame
    site = Site("module", "spatial", 2, 16)
    router = Router(model=attn, backend=Folded(), sites={"module": site}, info=ForwardInfo(hw=(2, 3), frames=4),
                    batch=3)
    router.plan = [Segment(1, 2, {"module": Identity()})]
    out = router.run_site("module", attn, (x,), {})
    plain = attn(x)
    assert torch.equal(out[:4], plain[:4]) and torch.equal(out[8:], plain[8:])
    torch.testing.assert_close(out[4:8], attn.to_out[0](attn.to_v(x[4:8])), rtol=0, atol=1e-6)


# AnimateDiff's UNetMotionModel: spatial sites (one frame, the frames folded into the batch) and temporal sites
# (one position across the frames, the positions folded into the batch), each call's grid read off its sequence
ANIMATEDIFF_MODES = ("identity", "strict", "uniform", "blur")


def _animatediff_image_of(frames=3, h=8, w=12):
    grids = {h * w: (1, h, w), (h // 2) * (w // 2): (1, h // 2, w // 2), frames: (frames, 1, 1)}

    def image_of(name, seq_len):
        grid = grids[seq_len]
        assert (grid[0] > 1) == (".motion_modules." in name), name  # temporal sites see the frames only
        return (0, seq_len), grid
    return image_of


def test_animatediff_sites_spatial_and_temporal_and_the_mid_alias_is_spatial():
    model = V.animatediff()
    infos = {i.name: i for i in pagkit.layers(model)}
    assert {i.kind for i in infos.values()} == {"spatial", "temporal"}
    assert all((i.kind == "temporal") == (".motion_modules." in n) for n, i in infos.items())
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" not in infos  # cross-attention
    assert "down_blocks.0.motion_modules.0.transformer_blocks.0.attn2" in infos  # motion modules: self-attention
    assert pagkit.resolve_layers(model, "mid") == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert pagkit.resolve_layers(model, "mid_block.motion_modules.*") == [
        "mid_block.motion_modules.0.transformer_blocks.0.attn1", "mid_block.motion_modules.0.transformer_blocks.0.attn2"]
    assert pagkit.resolve_layers(model, "mid.motion_modules.0") == pagkit.resolve_layers(model,
                                                                                          "mid_block.motion_modules.*")
    x, t, cond = V.animatediff_inputs()
    backend = GuidedDenoiser(model, []).backend
    info = backend.forward_info(model, x, cond)
    grids = {s.name: backend.layout(s, 0, info).grid for s in backend.sites(model)}
    assert grids["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == (1, 8, 12)
    assert grids["mid_block.attentions.0.transformer_blocks.0.attn1"] == (1, 4, 6)
    assert grids["mid_block.motion_modules.0.transformer_blocks.0.attn1"] == (3, 1, 1)


@pytest.mark.parametrize("mode", ANIMATEDIFF_MODES)
def test_animatediff_perturbed_branch_equals_the_explicit_reference(mode, monkeypatch):
    model = V.animatediff()
    x, t, cond = V.animatediff_inputs()
    plain = _call(model, x, t, cond)
    infos = pagkit.layers(model)
    spatial = [i.name for i in infos if i.kind == "spatial"]
    temporal = [i.name for i in infos if i.kind == "temporal"]
    spec = dict(functional=[attention_processor], dispatch=[])
    for names in (spatial[:1], temporal[:1], ["mid_block.motion_modules.0.transformer_blocks.0.attn2"],
                  spatial + temporal):
        ours = _routed_call(model, names, PERTURBATIONS[mode], x, t, cond)
        with monkeypatch.context() as m:
            image_of = _animatediff_image_of()
            patch_attention(m, model, names, lambda name, q, k, v, **kw: explicit_attention(
                q, k, v, *image_of(name, q.shape[-2]), mode, **kw), spec["functional"], spec["dispatch"])
            expected = _call(model, x, t, cond)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
        assert (ours - plain).abs().max() > 1e-4, names


def test_animatediff_neutral_untouched_rows_prefix_sharing_and_restore():
    model = V.animatediff()
    x, t, cond = V.animatediff_inputs(batch=3)
    plain = _call(model, x, t, cond)
    names = [i.name for i in pagkit.layers(model)]
    per_sample = GuidedDenoiser(model, []).backend.per_sample_inputs(model, x, cond)
    assert per_sample["encoder_hidden_states"].shape[:2] == (3, 3)  # (B, F, S, C): one row per sample
    neutral = GuidedDenoiser(model, [pagkit.PAG(0.0, layers=names)]).predict(x, t, per_sample)
    assert torch.equal(neutral, plain)
    for rows in ((1, 2), (0, 1), (2, 3)):  # the (b f) and (b h w) rows of one sample only
        out = _routed_call(model, names, Identity(), x, t, cond, rows=rows)
        for r in range(3):
            assert torch.equal(out[r], plain[r]) != (r == rows[0]), (rows, r)
    # batched [c; PAG; SEG] = separate perturbed calls; prefix sharing (conv_in and the down blocks run on the
    # conditional sample's F folded rows, copied F rows a branch) = the full batched pass
    mid = "mid"
    terms = [pagkit.PAG(2.0, layers=mid), pagkit.SEG(1.5, sigma=SIGMA, layers=mid)]
    assert pagkit.prefix.prefix_stages(model, pagkit.resolve_layers(model, mid)) == [
        "conv_in", "down_blocks.0", "down_blocks.1"]
    batched = GuidedDenoiser(model, terms).predict(x, t, per_sample)
    full = GuidedDenoiser(model, terms, prefix_sharing=False).predict(x, t, per_sample)
    torch.testing.assert_close(batched, full, rtol=0, atol=1e-5)
    calls = []
    hook = model.down_blocks[0].resnets[0].register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((list(args) + list(kwargs.values()))[0].shape[0]), with_kwargs=True)
    GuidedDenoiser(model, terms).predict(x, t, per_sample)
    hook.remove()
    assert calls == [3 * 3]  # inside the shared stage, the conditional rows only: 3 samples × 3 frames, not 27
    [site] = pagkit.resolve_layers(model, mid)
    separate = plain + 2.0 * (plain - _routed_call(model, [site], Identity(), x, t, cond)) \
        + 1.5 * (plain - _routed_call(model, [site], QueryBlur(SIGMA), x, t, cond))
    torch.testing.assert_close(batched, separate, rtol=0, atol=1e-5)
    with pytest.raises(KeyError):
        with routed(model, names) as router:
            router.plan = [Segment(0, 2, {n: Identity() for n in names})]
            raise KeyError("boom")
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(_call(model, x, t, cond), plain)
