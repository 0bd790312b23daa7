"""Every joint-attention family through the same invariants, against references written here.

The references compute attention explicitly, softmax(QKᵀ/√d + M)·V with an explicit mask M (−∞ on the
image→image block off its diagonal), at the point where the model's own processor would call
attention, so QK-norm and RoPE are the model's own and the maths is independent of pagkit's.
"""
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models import attention_processor
from diffusers.models.transformers import (transformer_cogview4, transformer_flux, transformer_flux2,
                                           transformer_hidream_image, transformer_lumina2, transformer_qwenimage,
                                           transformer_z_image)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from contract.reference import patch_attention  # noqa: E402

import pagkit  # noqa: E402
from pagkit.denoise import GuidedDenoiser  # noqa: E402
from pagkit.perturb import Identity, Uniform  # noqa: E402
from pagkit.routing import Segment, routed  # noqa: E402

FAMILIES = {
    "sd3": (lambda: models.sd3(), models.sd3_inputs),
    "sd3.5": (lambda: models.sd3(qk_norm="rms_norm", dual_attention_layers=(0, 1)), models.sd3_inputs),
    "flux": (models.flux, models.flux_inputs),
    "qwenimage": (models.qwenimage, models.qwenimage_inputs),
    "qwenimage-edit-zero-cond-t": (lambda: models.qwenimage(zero_cond_t=True), models.qwenimage_edit_inputs),
    "chroma": (models.chroma, models.chroma_inputs),
    "auraflow": (models.auraflow, models.auraflow_inputs),
    "cogview4": (models.cogview4, models.cogview4_inputs),
    "lumina2": (models.lumina2, models.lumina2_inputs),
    "flux2": (models.flux2, models.flux2_inputs),
    "hidream": (models.hidream, lambda **kw: models.hidream_inputs(**kw, native=False)),
    "zimage": (models.zimage, models.zimage_inputs),
}

# modules whose processors call diffusers' dispatch_attention_fn by the name they imported
DISPATCH_MODULES = (transformer_flux, transformer_flux2, transformer_qwenimage, transformer_z_image)
# modules whose processors call torch.nn.functional's SDPA through their own name F
F_MODULES = (attention_processor, transformer_cogview4, transformer_lumina2, transformer_hidream_image)

# per family: the kinds of its sites, and modules that hold attention but must not be sites
KINDS = {"qwenimage": {"joint"}, "qwenimage-edit-zero-cond-t": {"joint"}, "chroma": {"joint", "single"},
         "auraflow": {"joint", "single"}, "cogview4": {"joint"},
         "lumina2": {"self", "single"}, "flux2": {"joint", "single"}, "hidream": {"joint", "single"},
         "zimage": {"self", "single"}}
NOT_SITES = {"lumina2": ["context_refiner.0.attn"], "zimage": ["context_refiner.0.attention", "context_refiner.1.attention"]}
# per family: whether the image tokens come first in its joint/single-stream sequences (read off the processors)
IMAGE_FIRST = {"sd3": True, "sd3.5": True, "flux": False, "qwenimage": False, "qwenimage-edit-zero-cond-t": False,
               "chroma": False, "auraflow": False,
               "cogview4": False, "lumina2": False, "flux2": False, "hidream": True, "zimage": True}
# per family: the image grid its backend reads off the inputs of tests/models.py (in the units sites divide by)
GRIDS = {"qwenimage": (4, 6), "qwenimage-edit-zero-cond-t": (1, 48), "chroma": (4, 6), "auraflow": (8, 12), "cogview4": (8, 12), "lumina2": (8, 12),
         "flux2": (4, 6), "hidream": (4, 4), "zimage": (4, 6)}




def _forward(model, x, t, cond):
    """The model's prediction, called by its family's convention (inputs per sample on axis 0, as pagkit's)."""
    return GuidedDenoiser(model, []).backend.call(model, x, t, cond)


def _explicit_attention(q, k, v, image, mode, attn_mask=None, scale=None, enable_gqa=False, **_):
    """(B, H, S, d) → (B, H, S, d); ``image`` = (start, stop) of the image tokens; ``attn_mask`` as SDPA's."""
    a, b = image
    if k.shape[1] != q.shape[1]:  # grouped-query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-1, -2) * s
    mask = torch.zeros(logits.shape)
    if attn_mask is not None:  # the model's own mask (bool: True = attend), kept on every query
        mask = mask + (torch.zeros(attn_mask.shape).masked_fill(~attn_mask, float("-inf"))
                       if attn_mask.dtype == torch.bool else attn_mask)
    if mode == "identity":
        block = torch.full((b - a, b - a), float("-inf"))
        block.fill_diagonal_(0.0)
        mask[..., a:b, a:b] = mask[..., a:b, a:b] + block
    if mode == "uniform":  # every image query is the mean image query
        q = q.clone()
        q[:, :, a:b] = q[:, :, a:b].mean(dim=2, keepdim=True)
        logits = q @ k.transpose(-1, -2) * s
    out = torch.softmax(logits + mask, dim=-1) @ v
    if mode == "strict":
        out[:, :, a:b] = v[:, :, a:b]
    return out


def _image_of(model, x):
    sites = {s.name: s for s in pagkit.layers(model)}
    backend_sites = {s.name: s for s in GuidedDenoiser(model, []).backend.sites(model)}
    if x.ndim == 5:  # Z-Image: (B, C, F, H, W), patch p (frames unpatched); its pad tokens are not image tokens
        p = model.config["all_patch_size"][0]
        n = x.shape[2] * (x.shape[-2] // p) * (x.shape[-1] // p)
    else:
        n = (x.shape[-2] // model.config.patch_size) * (x.shape[-1] // model.config.patch_size) if x.ndim == 4 \
            else x.shape[1]

    def image_of(name, seq_len):
        assert name in sites
        return (0, n) if backend_sites[name].image_first else (seq_len - n, seq_len)
    return image_of


def _site_sets(model):
    kinds = {}
    for info in pagkit.layers(model):
        kinds.setdefault(info.kind, []).append(info.name)
    return [names[:1] for names in kinds.values()] + [[i.name for i in pagkit.layers(model)]]


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_have_kinds_and_no_text_only_or_cross_attention(family):
    model = FAMILIES[family][0]()
    kinds = {info.name: info.kind for info in pagkit.layers(model)}
    backend_sites = GuidedDenoiser(model, []).backend.sites(model)
    assert {s.image_first for s in backend_sites if s.kind != "self"} == {IMAGE_FIRST[family]}
    for name in NOT_SITES.get(family, ()):
        assert name in dict(model.named_modules()) and name not in kinds, name
        with pytest.raises(ValueError, match="not a perturbable site|cross-attention"):
            pagkit.resolve_layers(model, name)
    if family in KINDS:
        assert set(kinds.values()) == KINDS[family]
    elif family == "flux":
        assert set(kinds.values()) == {"joint", "single"}
        assert pagkit.resolve_layers(model, "single.1") == ["single_transformer_blocks.1.attn"]
        assert pagkit.resolve_layers(model, "double.0") == ["transformer_blocks.0.attn"]
    else:
        assert {k for n, k in kinds.items() if n.endswith(".attn")} == {"joint"}
        assert {k for n, k in kinds.items() if n.endswith(".attn2")} <= {"self"}
        assert (family == "sd3.5") == any(n.endswith(".attn2") for n in kinds)


@pytest.mark.parametrize("family", sorted(GRIDS))
def test_forward_info_reads_the_image_grid(family):
    build, inputs = FAMILIES[family]
    model = build()
    x, t, cond = inputs()
    assert GuidedDenoiser(model, []).backend.forward_info(model, x, cond).hw == GRIDS[family]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["identity", "strict", "uniform"])
def test_perturbed_branch_equals_the_explicit_mask_reference(family, mode, monkeypatch):
    build, inputs = FAMILIES[family]
    model = build()
    x, t, cond = inputs()
    perturbation = {"identity": Identity(), "strict": Identity(strict=True), "uniform": Uniform()}[mode]
    backend = GuidedDenoiser(model, []).backend
    for names in _site_sets(model):
        with routed(model, names) as router:
            router.info = backend.forward_info(model, x, cond)
            router.plan = [Segment(0, x.shape[0], {n: perturbation for n in names})]
            ours = _forward(model, x, t, cond)
        with monkeypatch.context() as m:
            image_of = _image_of(model, x)
            patch_attention(m, model, names, lambda name, q, k, v, **kw: _explicit_attention(
                q, k, v, image_of(name, q.shape[-2]), mode, **kw), F_MODULES, DISPATCH_MODULES)
            expected = _forward(model, x, t, cond)
        plain = _forward(model, x, t, cond)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
        assert (ours - plain).abs().max() > 1e-3, names  # the perturbation changed something


@pytest.mark.parametrize("family", FAMILIES)
def test_neutral_scale_and_untouched_rows_are_bit_identical(family):
    build, inputs = FAMILIES[family]
    model = build()
    x, t, cond = inputs(batch=3)
    plain = _forward(model, x, t, cond)
    names = [i.name for i in pagkit.layers(model)]
    neutral = GuidedDenoiser(model, [pagkit.PAG(0.0, layers=names)]).predict(x, t, cond)
    assert torch.equal(neutral, plain)
    backend = GuidedDenoiser(model, []).backend
    with routed(model, names) as router:
        router.info = backend.forward_info(model, x, cond)
        router.plan = [Segment(1, 2, {n: Identity() for n in names})]
        out = _forward(model, x, t, cond)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2], plain[2])
    assert not torch.allclose(out[1], plain[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_sharing_is_exact_and_batched_equals_separate(family):
    build, inputs = FAMILIES[family]
    model = build()
    x, t, cond = inputs()
    last = pagkit.layers(model)[-1].name
    terms = [pagkit.PAG(2.0, layers=last), pagkit.SEG(1.5, layers=last)]
    shared = GuidedDenoiser(model, terms).predict(x, t, cond)
    full = GuidedDenoiser(model, terms, prefix_sharing=False).predict(x, t, cond)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    eps = _forward(model, x, t, cond)
    backend = GuidedDenoiser(model, []).backend

    def perturbed(p):
        with routed(model, [last]) as router:
            router.info = backend.forward_info(model, x, cond)
            router.plan = [Segment(0, x.shape[0], {last: p})]
            return _forward(model, x, t, cond)
    separate = eps + 2.0 * (eps - perturbed(Identity())) + 1.5 * (eps - perturbed(Uniform()))
    torch.testing.assert_close(full, separate, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_is_restored_after_an_exception(family):
    build, inputs = FAMILIES[family]
    model = build()
    x, t, cond = inputs()
    before = _forward(model, x, t, cond)
    names = [i.name for i in pagkit.layers(model)]
    with pytest.raises(KeyError):
        with routed(model, names) as router:
            router.plan = [Segment(0, 2, {n: Identity() for n in names})]
            raise KeyError("boom")
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(_forward(model, x, t, cond), before)


def test_guide_takes_the_transformers_own_signature():
    model = models.sd3()
    x, t, cond = models.sd3_inputs()
    guided = pagkit.guide(model, [pagkit.PAG(0.0, layers="blocks.0")])
    out = guided(hidden_states=x, timestep=t, **cond, return_dict=False)[0]
    assert torch.equal(out, model(hidden_states=x, timestep=t, **cond, return_dict=False)[0])


def test_prefix_sharing_passes_positional_shared_inputs_whole():
    """CogView4 hands its rotary table to every block positionally; with as many image tokens as shared rows
    (3 × 4 image tokens, batch 4 × 3 branches) a shape guess would slice it as if it were per sample."""
    model = models.cogview4()
    x, t, cond = models.cogview4_inputs(batch=4, h=6, w=8)
    last = pagkit.layers(model)[-1].name
    terms = [pagkit.PAG(2.0, layers=last), pagkit.SEG(1.5, layers=last)]
    shared = GuidedDenoiser(model, terms).predict(x, t, cond)
    full = GuidedDenoiser(model, terms, prefix_sharing=False).predict(x, t, cond)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)


def test_lumina2_image_tokens_follow_each_caption_not_the_end_of_the_sequence():
    """With CFG's negative caption longer than the prompt, Lumina2 packs the perturbed rows as
    [3 caption tokens; image; padding]: the batched guided step must equal the branches run separately
    (where the image is at the end), with prefix sharing and without."""
    model = models.lumina2()
    x, t, cond = models.lumina2_inputs(valid=3)
    _, _, uncond = models.lumina2_inputs(seed=2, valid=5)
    last = pagkit.layers(model)[-1].name
    terms = [pagkit.CFG(3.0), pagkit.PAG(2.0, layers=last), pagkit.SEG(1.5, layers=last)]
    backend = GuidedDenoiser(model, []).backend

    def run(inputs, p=None):
        with routed(model, [last] if p else []) as router:
            router.info = backend.forward_info(model, x, inputs)
            router.plan = [Segment(0, x.shape[0], {last: p})] if p else []
            return _forward(model, x, t, inputs)
    eps_c, eps_u = run(cond), run(uncond)
    separate = (eps_u + 3.0 * (eps_c - eps_u) + 2.0 * (eps_c - run(cond, Identity()))
                + 1.5 * (eps_c - run(cond, Uniform())))
    for sharing in (True, False):
        batched = GuidedDenoiser(model, terms, prefix_sharing=sharing).predict(x, t, cond, uncond)
        torch.testing.assert_close(batched, separate, rtol=0, atol=1e-5)


def test_lumina2_prompts_of_different_lengths_perturb_each_row_at_its_own_image_tokens():
    """Captions of 4 and 3 valid tokens in one batch: each perturbed row's image sits after its own caption, so the
    batched guided step (with CFG, PAG and SEG; prefix sharing on and off) equals each sample run alone, where the
    layout is unambiguous. SAG's attention map has no single layout there and says so."""
    model = models.lumina2()
    x, t, cond = models.lumina2_inputs()
    cond["encoder_attention_mask"][0, 3] = True  # the first caption is one token longer
    _, _, uncond = models.lumina2_inputs(seed=2, valid=5)
    terms = [pagkit.CFG(3.0), pagkit.PAG(2.0, layers="layers.1.attn"), pagkit.SEG(1.5, layers="layers.0.attn")]
    alone = torch.cat([GuidedDenoiser(model, terms).predict(x[i:i + 1], t[i:i + 1],
                                                            {k: v[i:i + 1] for k, v in cond.items()},
                                                            {k: v[i:i + 1] for k, v in uncond.items()})
                       for i in range(2)])
    for sharing in (True, False):
        batched = GuidedDenoiser(model, terms, prefix_sharing=sharing).predict(x, t, cond, uncond)
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    same_length = GuidedDenoiser(model, terms).predict(x, t, models.lumina2_inputs()[2], uncond)
    assert (same_length[0] - batched[0]).abs().max() > 1e-4  # the longer caption does move the first sample
    with pytest.raises(ValueError, match="differ in length"):
        GuidedDenoiser(model, [pagkit.SAG(1.0, layer="layers.1.attn")], scheduler=models.ddim()).predict(x, t, cond)


def test_hidream_native_llama_states_and_a_non_square_padded_image_stream():
    """HiDream takes its Llama states as (layers, batch, tokens, dim): per_sample_inputs puts the batch first and
    call puts it back. A non-square latent is padded to max_seq image tokens: the image stream is all of them."""
    model = models.hidream()
    x, t, native = models.hidream_inputs(batch=3)
    backend = GuidedDenoiser(model, []).backend
    inputs = backend.per_sample_inputs(model, x, native)
    assert inputs["encoder_hidden_states_llama3"].shape[0] == 3
    assert torch.equal(backend.call(model, x, t, inputs), model(x, timesteps=t, **native, return_dict=False)[0])
    x, t, cond = models.hidream_inputs(h=8, w=12, native=False)
    assert backend.forward_info(model, x, cond).hw == (1, model.max_seq)
    names = [i.name for i in pagkit.layers(model)]
    plain = _forward(model, x, t, cond)
    assert torch.equal(GuidedDenoiser(model, [pagkit.PAG(0.0, layers=names)]).predict(x, t, cond), plain)
    guided = GuidedDenoiser(model, [pagkit.PAG(2.0, layers=names)]).predict(x, t, cond)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3


def test_zimage_batched_cfg_with_captions_of_other_lengths_equals_the_branches_run_separately():
    """Z-Image's single-stream rows are [image; caption padded to 32]: the image is at [0, n) whatever the caption's
    length, so a negative caption of another length (37 → 64 tokens against 5 → 32) still has one layout."""
    model = models.zimage()
    x, t, cond = models.zimage_inputs(text=5)
    _, _, uncond = models.zimage_inputs(seed=2, text=37)
    last = pagkit.layers(model)[-1].name
    terms = [pagkit.CFG(3.0), pagkit.PAG(2.0, layers=[last, "noise_refiner.1.attention"]),
             pagkit.SEG(1.5, layers=last)]
    backend = GuidedDenoiser(model, []).backend

    def run(inputs, p=None, names=()):
        with routed(model, list(names)) as router:
            router.info = backend.forward_info(model, x, inputs)
            router.plan = [Segment(0, x.shape[0], {n: p for n in names})] if p else []
            return _forward(model, x, t, inputs)
    eps_c, eps_u = run(cond), run(uncond)
    separate = (eps_u + 3.0 * (eps_c - eps_u)
                + 2.0 * (eps_c - run(cond, Identity(), [last, "noise_refiner.1.attention"]))
                + 1.5 * (eps_c - run(cond, Uniform(), [last])))
    for sharing in (True, False):
        batched = GuidedDenoiser(model, terms, prefix_sharing=sharing).predict(x, t, cond, uncond)
        torch.testing.assert_close(batched, separate, rtol=0, atol=1e-5)


def test_zimage_guide_takes_and_returns_the_models_own_lists():
    """``guide(model)`` is called as ZImageTransformer2DModel is: x and cap_feats as lists (captions of varying
    lengths), the timestep as ``t``; it returns the model's list. Neutral = the model; CFG + PAG = by hand."""
    model = models.zimage()
    xs, t, native = models.zimage_inputs(batch=2, native=True)
    _, _, negative = models.zimage_inputs(batch=2, seed=2, text=(9, 3), native=True)
    plain = model(xs, t, native["cap_feats"], return_dict=False)[0]
    neutral = pagkit.guide(model, [pagkit.PAG(0.0, layers="layers.0.attention")])
    out = neutral(xs, t=t, cap_feats=native["cap_feats"], return_dict=False)[0]
    assert isinstance(out, list) and all(torch.equal(a, b) for a, b in zip(out, plain))
    guided = pagkit.guide(model, [pagkit.CFG(2.0), pagkit.PAG(1.5, layers="layers.0.attention")], uncond=negative)
    out = guided(x=xs, t=t, cap_feats=native["cap_feats"], progress=0.0).sample
    x, _, cond = models.zimage_inputs(batch=2)
    _, _, uncond = models.zimage_inputs(batch=2, seed=2, text=(9, 3))
    backend = GuidedDenoiser(model, []).backend
    eps_c, eps_u = _forward(model, x, t, cond), _forward(model, x, t, uncond)
    with routed(model, ["layers.0.attention"]) as router:
        router.info = backend.forward_info(model, x, cond)
        router.plan = [Segment(0, 2, {"layers.0.attention": Identity()})]
        eps_p = _forward(model, x, t, cond)
    expected = eps_u + 2.0 * (eps_c - eps_u) + 1.5 * (eps_c - eps_p)
    torch.testing.assert_close(torch.stack(out), expected, rtol=0, atol=1e-5)


def test_zimage_timestep_and_stacking_errors():
    model = models.zimage()
    backend = GuidedDenoiser(model, []).backend
    assert backend.timestep_name == "t" and backend.scheduler_timestep(torch.tensor([0.25, 0.25])) == 750.0
    with pytest.raises(ValueError, match="one latent size"):
        backend.input_batch(model, [torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 12)])
    with pytest.raises(ValueError, match="omni"):
        backend.input_batch(model, [[torch.zeros(4, 1, 8, 8)]])


def test_flux2_kv_cache_given_to_predict_directly_needs_one_row_per_model_row():
    """Flux.2-klein's KV cache holds rows of the caller's batch: pagkit.attach turns it into per-sample tensors
    (Backend.per_sample_inputs, tests/test_flux2_kv.py); a cache object given to predict as it is, with fewer rows
    than the guided batch, is one clear error before the forward."""
    model = models.flux2()
    for block in model.transformer_blocks:  # as Flux2KleinKVPipeline sets them
        block.attn.set_processor(transformer_flux2.Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(transformer_flux2.Flux2KVParallelSelfAttnProcessor())
    x, t, cond = models.flux2_inputs(batch=1)
    with torch.no_grad():
        _, cache = model(x, timestep=t, **cond, kv_cache_mode="extract", num_ref_tokens=4, return_dict=False)
    with pytest.raises(ValueError, match=r"KV cache of \[1\] rows for a batch of 2.*per_sample_inputs"):
        GuidedDenoiser(model, [pagkit.PAG(2.0, layers="transformer_blocks.0.attn")]).predict(
            x[:, 4:], t, {**cond, "img_ids": cond["img_ids"][4:], "kv_cache": cache, "kv_cache_mode": "cached"})
    assert not any("forward" in vars(m) for m in model.modules())
