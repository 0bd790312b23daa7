"""TPG, token perturbation guidance (arXiv 2506.10036): the tokens entering the chosen blocks are permuted on the
perturbed rows (routing.TokenShuffle), a fresh seeded permutation per block call, one for every sample.

The reference is written here, independently of routing: a forward pre-hook on each chosen block replaces its token
input by ``x[:, perm]`` (a (B, C, H, W) input: its H·W positions) with ``perm = torch.randperm(n, generator=g)``
drawn from a generator seeded as the term, in the blocks' call order, as the official code
(TaatiTeam/Token-Perturbation-Guidance, pipeline_sdxl_tpg.py, ``shuffle_tokens``) does with the global RNG.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

import pagkit  # noqa: E402
from pagkit.backends import detect  # noqa: E402
from pagkit.denoise import GuidedDenoiser  # noqa: E402
from pagkit.methods.slg import resolve_blocks  # noqa: E402
from pagkit.routing import Segment, TokenShuffle, routed  # noqa: E402


def _unet2d():
    model = models.unet2d(num_class_embeds=11)
    g = torch.Generator().manual_seed(3)
    return (model, torch.randn(2, 1, 16, 16, generator=g), torch.tensor(400), {"class_labels": torch.tensor([3, 4])},
            {"class_labels": torch.tensor([10, 10])})


def _sd_unet():
    g = torch.Generator().manual_seed(3)
    return (models.sd_unet(), torch.randn(2, 4, 16, 16, generator=g), torch.tensor(400),
            {"encoder_hidden_states": torch.randn(2, 7, 24, generator=g)},
            {"encoder_hidden_states": torch.randn(2, 7, 24, generator=g)})


def _sd3():
    x, t, cond = models.sd3_inputs()
    _, _, uncond = models.sd3_inputs(seed=2)
    return models.sd3(), x, t, cond, uncond


def _dit():
    g = torch.Generator().manual_seed(3)
    return (models.dit(), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([400, 400]),
            {"class_labels": torch.tensor([3, 4])}, {"class_labels": torch.tensor([1000, 1000])})


def _video(family):
    """A video family's tiny model with two conditions (tests/video_models.py)."""
    import video_models as V

    def build():
        model = getattr(V, family)()
        x, t, cond = getattr(V, f"{family}_inputs")()
        _, _, uncond = getattr(V, f"{family}_inputs")(seed=2)
        return model, x, t, cond, uncond
    return build


FAMILIES = {  # builder, block selection
    "unet2d": (_unet2d, ["down.1", "mid"]),
    "sd-unet": (_sd_unet, [0, 2, 3]),
    "sd3": (_sd3, [0, 2]),
    "dit": (_dit, [3, 7]),
    # video: the (B, F·H·W, C) tokens of a video block, permuted over space and time alike
    "wan": (_video("wan"), [0, 1]),
    "ltx": (_video("ltx"), [0, 1]),
    "mochi": (_video("mochi"), [0, 1]),
}


def _forward(model, x, t, cond):
    return GuidedDenoiser(model, []).backend.call(model, x, t, cond)


def shuffled(model, blocks, seed, run, generator=None):
    """``run()`` with the token input of each block in ``blocks`` permuted by hand (the module docstring)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if x.ndim == 4:
            b, c, h, w = x.shape
            x = x.reshape(b, c, h * w)[:, :, torch.randperm(h * w, generator=g)].reshape(b, c, h, w)
        else:
            x = x[:, torch.randperm(x.shape[1], generator=g)]
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
    handles = [model.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True) for n in blocks]
    try:
        return run()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_tpg_branch_equals_the_hand_shuffled_block_input(family):
    build, layers = FAMILIES[family]
    model, x, t, cond, uncond = build()
    blocks = resolve_blocks(model, detect(model), layers, detect(model).token_blocks(model), "TPG")
    assert len(blocks) >= 2
    eps_c, eps_u = _forward(model, x, t, cond), _forward(model, x, t, uncond)
    eps_tpg = shuffled(model, blocks, 5, lambda: _forward(model, x, t, cond))
    assert (eps_tpg - eps_c).abs().max() > 1e-3  # the shuffle changed something
    c = x.shape[1]

    def guided_as(expected):  # DiT predicts ε and σ: only ε is guided, σ is the conditional one
        return torch.cat([expected[:, :c], eps_c[:, c:]], dim=1)
    for sharing in (True, False):
        guided = GuidedDenoiser(model, [pagkit.TPG(2.0, layers=layers, seed=5)],
                                prefix_sharing=sharing).predict(x, t, cond)
        torch.testing.assert_close(guided, guided_as(eps_c + 2.0 * (eps_c - eps_tpg)), rtol=0, atol=1e-5)
    # with CFG: ε_u + w(ε_c − ε_u) + s(ε_c − ε_tpg), in the one batched forward
    guided = GuidedDenoiser(model, [pagkit.CFG(3.0), pagkit.TPG(2.0, layers=layers, seed=5)]).predict(
        x, t, cond, uncond)
    expected = eps_u + 3.0 * (eps_c - eps_u) + 2.0 * (eps_c - eps_tpg)
    torch.testing.assert_close(guided, guided_as(expected), rtol=0, atol=1e-5)


def test_default_blocks_are_the_official_sdxl_ones():
    """The official default d6–d23: SDXL's down-block BasicTransformerBlocks 6–23 (2×2 in down_blocks.1, 2×10 in
    down_blocks.2), in an SDXL-shaped UNet with SDXL's transformer depths (tiny channels)."""
    model = models.sdxl_unet(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
                             attention_head_dim=(2, 2, 2), transformer_layers_per_block=(1, 2, 10),
                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    backend = detect(model)
    official = [n for n, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock"
                and n.startswith("down")][6:24]
    chosen = resolve_blocks(model, backend, pagkit.TPG().layers, backend.token_blocks(model), "TPG")
    assert chosen == official
    assert chosen[0] == "down_blocks.2.attentions.0.transformer_blocks.2"
    assert chosen[-1] == "down_blocks.2.attentions.1.transformer_blocks.9"
    assert pagkit.TPG().scale == 3.0


def test_one_permutation_for_every_sample_and_text_tokens_untouched():
    model, x, t, cond, _ = _sd3()
    x = x[:1].repeat(2, 1, 1, 1)
    cond = {k: v[:1].repeat(2, *([1] * (v.ndim - 1))) for k, v in cond.items()}
    seen = []
    block = model.get_submodule("transformer_blocks.1")
    handle = block.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["hidden_states"].clone(),
                                                                          kw["encoder_hidden_states"].clone())),
                                             with_kwargs=True)
    try:
        plain = _forward(model, x, t, cond)
        with routed(model, ["transformer_blocks.1"]) as router:
            router.info = detect(model).forward_info(model, x, cond)
            router.plan = [Segment(0, 2, {"transformer_blocks.1": TokenShuffle(0)})]
            out = _forward(model, x, t, cond)
    finally:
        handle.remove()
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)  # the same permutation on both samples
    assert (out - plain).abs().max() > 1e-3
    (h0, e0), (h1, e1) = seen  # the pre-hook sees the block's input before routing's forward patch shuffles it
    assert torch.equal(e0, e1) and torch.equal(h0, h1)
    # what the block computed on: one permutation of the image tokens, the text stream as it came in
    shuffle = TokenShuffle(0)
    h = shuffle.shuffle(h0, (0, 2), (0, h0.shape[1]))
    perm = TokenShuffle(0).permutation(h0.shape[1])
    assert torch.equal(h, h0[:, perm]) and not torch.equal(perm, torch.arange(h0.shape[1]))


def test_a_fresh_permutation_at_every_call_from_the_terms_own_generator():
    model, x, t, cond, _ = _sd_unet()
    blocks = resolve_blocks(model, detect(model), [0, 3], detect(model).token_blocks(model), "TPG")
    denoiser = GuidedDenoiser(model, [pagkit.TPG(2.0, layers=[0, 3], seed=1)])
    first, second = denoiser.predict(x, t, cond), denoiser.predict(x, t, cond)
    assert (first - second).abs().max() > 1e-3  # step 2 draws new permutations
    eps_c = _forward(model, x, t, cond)
    g = torch.Generator().manual_seed(1)
    for ours in (first, second):  # one stream: step 1's draws, then step 2's
        eps_tpg = shuffled(model, blocks, None, lambda: _forward(model, x, t, cond), generator=g)
        torch.testing.assert_close(ours, eps_c + 2.0 * (eps_c - eps_tpg), rtol=0, atol=1e-5)


def _sample(model, guidance, **kw):
    return pagkit.sample(model, models.ddim(), batch_size=2, num_inference_steps=4, guidance=guidance,
                         generator=torch.Generator().manual_seed(0), progress_bar=False,
                         class_labels=torch.tensor([1, 2]), null_class_label=10, **kw)


def test_seed_neutral_scale_and_schedule():
    model = models.unet2d(num_class_embeds=11)
    base = _sample(model, [pagkit.CFG(2.0)])
    assert torch.equal(_sample(model, [pagkit.CFG(2.0), pagkit.TPG(0.0, layers="mid")]), base)
    assert torch.equal(_sample(model, [pagkit.CFG(2.0), pagkit.TPG(3.0, layers="mid", start=0.9)]), base)
    denoiser = GuidedDenoiser(model, [pagkit.TPG(3.0, layers="mid", stop=0.5)])
    assert [len(denoiser.branches(i / 4)[0]) for i in range(4)] == [2, 2, 1, 1]
    one = _sample(model, [pagkit.CFG(2.0), pagkit.TPG(3.0, layers=["down.1", "mid"], seed=7)])
    again = _sample(model, [pagkit.CFG(2.0), pagkit.TPG(3.0, layers=["down.1", "mid"], seed=7)])
    other = _sample(model, [pagkit.CFG(2.0), pagkit.TPG(3.0, layers=["down.1", "mid"], seed=8)])
    assert torch.equal(one, again)
    assert (one - other).abs().max() > 1e-4 and (one - base).abs().max() > 1e-4


def test_joins_the_one_batched_forward():
    model, x, t, cond, uncond = _sd_unet()
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        GuidedDenoiser(model, [pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid"), pagkit.TPG(1.0, layers=[0, 1])]
                       ).predict(x, t, cond, uncond)
    finally:
        handle.remove()
    assert calls == [8]  # uncond, cond, pag, tpg: one call


def test_restored_after_an_exception():
    model, x, t, cond, _ = _sd3()
    before = _forward(model, x, t, cond)
    with pytest.raises(RuntimeError, match="boom"):
        with routed(model, ["transformer_blocks.1"]) as router:
            router.info = detect(model).forward_info(model, x, cond)
            router.plan = [Segment(1, 2, {"transformer_blocks.1": TokenShuffle(0)})]
            out = _forward(model, x, t, cond)
            raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(_forward(model, x, t, cond), before)
    torch.testing.assert_close(out[:1], before[:1], rtol=0, atol=0)  # untouched rows are the model's
    assert not torch.allclose(out[1:], before[1:], atol=1e-3)
    model.proj_out.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # and through the denoiser
        GuidedDenoiser(model, [pagkit.TPG(2.0, layers=[1])]).predict(x, t, cond)
    assert not any("forward" in vars(m) for m in model.modules())


def test_video_blocks_that_fold_frames_into_the_batch_are_refused():
    """AnimateDiff's blocks take B·F (or B·H·W) rows: TPG there is refused with the reason, not run on wrong rows."""
    import video_models as V
    model, (x, t, cond) = V.animatediff(), V.animatediff_inputs()
    with pytest.raises(ValueError, match="fold frames into the batch"):
        GuidedDenoiser(model, [pagkit.TPG(2.0, layers="mid", seed=1)]).predict(x, t, cond)
    assert not any("forward" in vars(m) for m in model.modules())


def test_bad_arguments_are_clear_errors_before_sampling():
    for kw, message in [(dict(layers=[]), "at least one block"), (dict(layers=[-1]), "block indices"),
                        (dict(layers=[True]), "block indices"), (dict(layers=[""]), "block indices"),
                        (dict(seed=1.5), "seed must be an int"), (dict(scale=float("inf")), "finite")]:
        with pytest.raises(ValueError, match=message):
            pagkit.TPG(**kw)
    with pytest.raises(ValueError, match=r"TPG block index 6 is out of range: .* has 3 blocks it can perturb"):
        GuidedDenoiser(models.sd3(), [pagkit.TPG()])
    with pytest.raises(ValueError, match="unknown layer"):
        GuidedDenoiser(models.unet2d(), [pagkit.TPG(layers="middle")])
    with pytest.raises(ValueError, match="matches no block"):
        GuidedDenoiser(models.sd3(), [pagkit.TPG(layers="blocks.*.attn")])


@pytest.mark.parametrize("family,block,image", [
    ("auraflow", "single_transformer_blocks.1", lambda seq, n: (seq - n, seq)),  # [register + text; image]
    ("lumina2", "layers.1", lambda seq, n: (3, 3 + n)),  # [3 valid caption tokens; image; padding]
])
def test_single_stream_blocks_shuffle_the_image_tokens_only(family, block, image):
    model = getattr(models, family)()
    x, t, cond = getattr(models, f"{family}_inputs")()
    n = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    g = torch.Generator().manual_seed(4)

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        a, b = image(h.shape[1], n)
        h = h.clone()
        h[:, a:b] = h[:, a:b][:, torch.randperm(b - a, generator=g)]
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
    handle = model.get_submodule(block).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        eps_tpg = _forward(model, x, t, cond)
    finally:
        handle.remove()
    eps_c = _forward(model, x, t, cond)
    assert (eps_tpg - eps_c).abs().max() > 1e-3
    guided = GuidedDenoiser(model, [pagkit.TPG(2.0, layers=block, seed=4)]).predict(x, t, cond)
    # AuraFlow's test weights (std 0.2) give outputs of order 1, hence the relative part
    torch.testing.assert_close(guided, eps_c + 2.0 * (eps_c - eps_tpg), rtol=1e-5, atol=1e-5)
