"""Cheaper variants of the contrast terms (issue 19): difference caching (``cache=k``) and folding into CFG's
unconditional branch (``fold=True``), on tiny random UNets, against reference loops written here with explicit
forwards (``routing.routed`` with one perturbed segment, as tests/test_methods.py does)."""
import inspect

import pytest
import torch

import models
import pagkit
from pagkit.cli import main
from pagkit.denoise import GuidedDenoiser
from pagkit.routing import Segment, routed
from pagkit.spec import format_spec, parse_spec

NULL = 10
B = 2


def _model():
    return models.unet2d(num_class_embeds=11)


def _labels():
    return dict(class_labels=torch.tensor([1, 2]), null_class_label=NULL)


def _sample(model, guidance, steps=4, labels=True, **kw):
    return pagkit.sample(model, models.ddim(), batch_size=B, num_inference_steps=steps, guidance=guidance,
                         generator=torch.Generator().manual_seed(0), progress_bar=False,
                         **(_labels() if labels else {}), **kw)


class _Count:
    """The rows of every model call, in a list (a forward pre-hook, removed on exit)."""

    def __init__(self, model):
        self.rows = []
        self.handle = model.register_forward_pre_hook(lambda m, a, k: self.rows.append(a[0].shape[0]), with_kwargs=True)

    def __enter__(self):
        return self.rows

    def __exit__(self, *exc):
        self.handle.remove()


def _perturbed(model, x, t, inputs, layers="mid"):
    """ε̂: the model with the self-attention of ``layers`` replaced by the identity, one explicit forward."""
    names = pagkit.resolve_layers(model, layers)
    with routed(model, names) as router:
        router.input_hw = tuple(x.shape[-2:])
        router.plan = [Segment(0, x.shape[0], {n: pagkit.PAG(1.0).make_perturbation() for n in names})]
        return model(x, t, **inputs).sample


def _reference(model, steps, guided):
    """A DDIM loop like pagkit.sample's: ``guided(i, x, t, cond, uncond)`` gives ε̃ at step i."""
    scheduler = models.ddim()
    x = torch.randn(B, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(steps)
    cond, uncond = {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([NULL, NULL])}
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.step(guided(i, x, t, cond, uncond), t, x, eta=0.0, return_dict=False)[0]
    return x


def _latents():
    return torch.randn(B, 1, 16, 16, generator=torch.Generator().manual_seed(0))


# --- difference caching ---------------------------------------------------------------------------------------

CONTRASTS = [lambda **o: pagkit.PAG(1.0, layers="mid", **o),
             lambda **o: pagkit.SEG(1.0, layers="mid", **o),
             lambda **o: pagkit.SLG(1.0, layers="mid", start=0.0, stop=1.0, **o),
             lambda **o: pagkit.TPG(1.0, layers="mid", **o)]


@pytest.mark.parametrize("make", CONTRASTS, ids=["pag", "seg", "slg", "tpg"])
def test_cache_1_is_bit_identical_to_no_caching(make):
    model = _model()
    plain = _sample(model, [pagkit.CFG(2.0), make()])
    assert torch.equal(_sample(model, [pagkit.CFG(2.0), make(cache=1)]), plain)
    assert torch.equal(_sample(model, [pagkit.CFG(2.0), make(cache=1, cache_mode="extrapolate")]), plain)


@pytest.mark.parametrize("make", CONTRASTS, ids=["pag", "seg", "slg", "tpg"])
def test_cache_at_neutral_scale_is_bit_identical_to_unguided(make):
    model = _model()
    term = make(cache=2)
    term.scale = 0.0
    assert torch.equal(_sample(model, [pagkit.CFG(2.0), term]), _sample(model, [pagkit.CFG(2.0)]))


@pytest.mark.parametrize("mode", ["reuse", "extrapolate"])
def test_cache_2_equals_a_reference_loop(mode):
    """PAG(s, cache=2): D = ε_c − ε̂ from explicit forwards on steps 0, 2, 4, …; in between D reused (or
    extrapolated linearly from the last two computed), with that step's own scale (a ramp here)."""
    model, steps, w = _model(), 6, 2.0
    term = pagkit.PAG(1.0, layers="mid", scale_end=2.0, cache=2, cache_mode=mode)
    computed = []  # (step, D)

    def guided(i, x, t, cond, uncond):
        eps_u, eps_c = model(x, t, **uncond).sample, model(x, t, **cond).sample
        if i % 2 == 0:
            computed.append((i, eps_c - _perturbed(model, x, t, cond)))
            d = computed[-1][1]
        elif mode == "reuse" or len(computed) < 2:
            d = computed[-1][1]
        else:
            (i1, d1), (i2, d2) = computed[-2:]
            d = d2 + (i - i2) / (i2 - i1) * (d2 - d1)
        return eps_u + w * (eps_c - eps_u) + term.scale_at(i / steps) * d

    reference = _reference(model, steps, guided)
    ours = _sample(model, [pagkit.CFG(w), term], steps=steps, latents=_latents())
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)  # |x| ~ 15: float32 batching noise
    exact = _sample(model, [pagkit.CFG(w), pagkit.PAG(1.0, layers="mid", scale_end=2.0)], steps=steps,
                    latents=_latents())
    assert not torch.allclose(ours, exact, atol=1e-6)  # caching did change something


def test_cached_steps_run_no_perturbed_rows_and_state_is_per_run():
    model = _model()
    for guidance, expected in [
        ([pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid", cache=2)], [6, 4, 6, 4, 6, 4]),
        ([pagkit.CFG(2.0), pagkit.SEG(1.0, layers="mid", cache=3)], [6, 4, 4, 6, 4, 4]),
        # SLG's interval is open (0 < i/N): its first active step is step 1
        ([pagkit.SLG(1.0, layers="mid", start=0.0, stop=1.0, cache=2)], [2, 4, 2, 4, 2, 4]),
        # active steps are counted: PAG acts from step 2 (progress 2/6) on, computing on its 1st and 3rd active steps
        ([pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid", start=0.3, cache=2)], [4, 4, 6, 4, 6, 4]),
        # two cached terms, each on its own period, still one batched call per step
        ([pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid", cache=2), pagkit.SEG(1.0, layers="mid", cache=3)],
         [8, 4, 6, 6, 6, 4]),
    ]:
        with _Count(model) as rows:
            first = _sample(model, guidance, steps=6)
        assert rows == expected, guidance
        with _Count(model) as rows:  # a second run starts its cache afresh: same rows, same result
            again = _sample(model, guidance, steps=6)
        assert rows == expected and torch.equal(first, again)


def test_cache_through_a_denoiser_resets_when_progress_goes_back():
    model = _model()
    denoiser = GuidedDenoiser(model, [pagkit.PAG(1.0, layers="mid", cache=2)])
    x, t = torch.randn(B, 1, 16, 16), torch.tensor(500)
    c = {"class_labels": torch.tensor([1, 2])}
    with _Count(model) as rows:
        for progress in (0.0, 0.0, 0.25, 0.5, 0.0, 0.25):  # a repeated call is the same step; 0.0 again: new run
            denoiser.predict(x, t, c, progress=progress)
    assert rows == [4, 4, 2, 4, 4, 2]


def test_cache_options_have_a_text_form_and_clear_errors():
    terms = parse_spec("cfg:2; pag:1,layers=mid,cache=2,cache_mode=extrapolate; slg:1,layers=mid,fold=false")
    assert terms[1] == pagkit.PAG(1.0, layers="mid", cache=2, cache_mode="extrapolate")
    assert parse_spec(format_spec(terms)) == terms
    for bad, words in [(dict(cache=0), "cache must be an integer >= 1"), (dict(cache=1.5), "cache must be"),
                       (dict(cache=True), "cache must be"), (dict(cache_mode="linear"), "'reuse', 'extrapolate'"),
                       (dict(fold="yes"), "fold must be true or false"),
                       (dict(fold=True, cache=2), "cache cannot be set"),
                       (dict(fold=True, scale_end=2.0), "scale_end cannot be set"),
                       (dict(fold=True, rule=pagkit.APG()), "rule cannot be set")]:
        with pytest.raises(ValueError, match=words):
            pagkit.PAG(1.0, **bad)
    with pytest.raises(ValueError, match="no option 'cache'"):
        parse_spec("sag:1,cache=2")  # only the contrast terms have it


def test_cli_sample_takes_a_cached_term(tmp_path, capsys):
    from diffusers import DDIMScheduler, DDPMPipeline
    DDPMPipeline(unet=models.unet2d(), scheduler=DDIMScheduler()).save_pretrained(tmp_path / "m")
    assert main(["sample", "--model", str(tmp_path / "m"), "--steps", "3", "--num-images", "2", "--quiet",
                 "--guidance", "pag:1,layers=mid,cache=2", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").exists()


# --- folding into the unconditional branch -------------------------------------------------------------------

@pytest.mark.parametrize("w", [2.0, 3.5])
def test_fold_equals_a_reference_with_the_perturbed_uncond_as_negative(w):
    """ε̃ = ε̂_u + w(ε_c − ε̂_u), ε̂_u the unconditional prediction with PAG's perturbation, on steps in [start, stop);
    plain CFG elsewhere. The term's own scale is only its switch."""
    model, steps = _model(), 6
    term = pagkit.PAG(5.0, layers="mid", start=0.3, stop=0.8, fold=True)

    def guided(i, x, t, cond, uncond):
        eps_c = model(x, t, **cond).sample
        eps_u = _perturbed(model, x, t, uncond) if term.in_interval(i / steps) else model(x, t, **uncond).sample
        return eps_u + w * (eps_c - eps_u)

    reference = _reference(model, steps, guided)
    with _Count(model) as rows:
        ours = _sample(model, [pagkit.CFG(w), term], steps=steps, latents=_latents())
    assert rows == [2 * B] * steps  # exactly CFG's two rows per sample
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)  # |x| ~ 15: float32 batching noise
    other_scale = _sample(model, [pagkit.CFG(w), pagkit.PAG(1.0, layers="mid", start=0.3, stop=0.8, fold=True)],
                          steps=steps, latents=_latents())
    assert torch.equal(ours, other_scale)
    assert not torch.allclose(ours, _sample(model, [pagkit.CFG(w)], steps=steps, latents=_latents()), atol=1e-4)


@pytest.mark.parametrize("make", CONTRASTS, ids=["pag", "seg", "slg", "tpg"])
def test_fold_costs_cfg_rows_and_is_off_at_scale_0(make):
    model = _model()
    with _Count(model) as rows:
        folded = _sample(model, [pagkit.CFG(2.0), make(fold=True)])
    assert rows == [2 * B] * 4
    cfg = _sample(model, [pagkit.CFG(2.0)])
    assert not torch.allclose(folded, cfg, atol=1e-5)
    off = make(fold=True)
    off.scale = 0.0
    assert torch.equal(_sample(model, [pagkit.CFG(2.0), off]), cfg)


def test_fold_needs_cfg_and_says_so_before_sampling():
    model = _model()
    with pytest.raises(ValueError, match=r"PAG\(fold=True\) .*needs a pagkit.CFG term"):
        GuidedDenoiser(model, [pagkit.PAG(1.0, layers="mid", fold=True)])
    with pytest.raises(ValueError, match="at most one may"):
        GuidedDenoiser(model, [pagkit.CFG(2.0), pagkit.PAG(1.0, fold=True), pagkit.SEG(1.0, fold=True)])
    assert parse_spec("cfg:2; seg:1,fold=true") == [pagkit.CFG(2.0), pagkit.SEG(1.0, fold=True)]


def test_fold_restores_the_model_after_an_exception():
    model = _model()
    forwards = {n: vars(m).get("forward") for n, m in model.named_modules()}
    processors = {n: getattr(m, "processor", None) for n, m in model.named_modules()}
    calls = {"n": 0}

    def explode(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")

    handle = model.mid_block.register_forward_pre_hook(explode, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _sample(model, [pagkit.CFG(2.0), pagkit.PAG(1.0, layers="mid", fold=True)])
    finally:
        handle.remove()
    assert {n: vars(m).get("forward") for n, m in model.named_modules()} == forwards
    assert {n: getattr(m, "processor", None) for n, m in model.named_modules()} == processors
    assert torch.equal(_sample(model, [pagkit.CFG(2.0)]), _sample(model, [pagkit.CFG(2.0)]))


def test_stg_on_a_video_model_caches_and_folds():
    """STG (residual, Wan): with the same x and t at every call, the reused difference is the exact one, so a cached
    step equals the exact prediction; the cached steps run no perturbed rows; fold costs CFG's rows."""
    import video_models as V
    from pagkit.backends import detect
    model = V.wan()
    x, t, cond = V.wan_inputs(batch=B)
    backend = detect(model)
    uncond = {**cond, "encoder_hidden_states": torch.randn(cond["encoder_hidden_states"].shape,
                                                           generator=torch.Generator().manual_seed(7))}
    cond, uncond = backend.per_sample_inputs(model, x, cond), backend.per_sample_inputs(model, x, uncond)
    cached = GuidedDenoiser(model, [pagkit.CFG(3.0), pagkit.STG(2.0, layers=[1], cache=2)])
    exact = GuidedDenoiser(model, [pagkit.CFG(3.0), pagkit.STG(2.0, layers=[1])])
    with _Count(model) as rows, torch.no_grad():
        for progress in (0.0, 0.25, 0.5, 0.75):
            ours = cached.predict(x, t, cond, uncond, progress=progress)
            torch.testing.assert_close(ours, exact.predict(x, t, cond, uncond, progress=progress), rtol=0, atol=1e-6)
    # calls alternate cached, exact: the cached denoiser runs CFG's rows only on its steps 1 and 3
    assert rows == [3 * B, 3 * B, 2 * B, 3 * B, 3 * B, 3 * B, 2 * B, 3 * B]
    folded = GuidedDenoiser(model, [pagkit.CFG(3.0), pagkit.STG(2.0, layers=[1], fold=True)])
    with _Count(model) as rows, torch.no_grad():
        out = folded.predict(x, t, cond, uncond, progress=0.5)
        cfg = GuidedDenoiser(model, [pagkit.CFG(3.0)]).predict(x, t, cond, uncond, progress=0.5)
    assert rows[0] == 2 * B and not torch.allclose(out, cfg, atol=1e-5)
    with pytest.raises(ValueError, match="rescale cannot be set"):
        pagkit.STG(1.0, layers=[1], fold=True, rescale=0.7)


# --- the Python around the forward ---------------------------------------------------------------------------

def test_guided_steps_through_sample_and_attach_do_not_walk_the_models_modules(monkeypatch):
    """Finding the sites, or a module by name through ``named_modules``, walks every module of the model (7 ms a
    step on the SD1.5-shaped UNet of ``pagkit bench``): a denoiser reads the sites once, then looks modules up by
    name. Counted here with CFG + PAG on the mid block (routed sites and prefix sharing) and SEG (another site)."""
    walks = []
    original = torch.nn.Module.named_modules

    def counting(self, *args, **kwargs):
        walks.append(type(self).__name__)
        return original(self, *args, **kwargs)

    pipe = models.sd_pipeline()
    g = torch.Generator().manual_seed(0)
    emb, neg = (torch.randn(1, 5, pipe.unet.config.cross_attention_dim, generator=g) for _ in range(2))
    terms = [pagkit.PAG(2.0, layers="mid"), pagkit.SEG(1.0, layers="up")]
    for steps in (2, 5):  # the walks of one run do not grow with its steps
        monkeypatch.setattr(torch.nn.Module, "named_modules", counting)
        with pagkit.attach(pipe, *terms):
            pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps, output_type="latent",
                 guidance_scale=5.0)
        pagkit.sample(pipe.unet, models.ddim(), num_inference_steps=steps, guidance=[pagkit.CFG(5.0), *terms],
                      encoder_hidden_states=emb, negative_encoder_hidden_states=neg, progress_bar=False)
        monkeypatch.undo()
        if steps == 2:
            at_two, walks[:] = len(walks), []
    assert len(walks) == at_two, walks


# --- the bench (pagkit bench, docs/bench_gpu.py) ---------------------------------------------------------------

def _tiny_sd15_configs(steps=2):
    from pagkit import bench
    unet = models.sd_unet(cross_attention_dim=24)
    return bench.sd15_configs(steps, batch=1, unet=unet, side=8, text=7)


def test_sd15_bench_times_attach_beside_diffusers_and_sample_and_attach_matches_diffusers():
    from pagkit import bench
    configs = _tiny_sd15_configs()
    results = bench.run_interleaved(configs, rounds=1, progress=False)
    table = bench.report("tiny", results, ["CFG 7.5 (diffusers)", "no guidance (diffusers)"])
    for row in ("CFG+PAG(mid) diffusers", "CFG+PAG(mid) pagkit", "CFG+PAG(mid) pagkit.attach",
                "PAG(mid) diffusers", "PAG(mid) pagkit", "PAG(mid) pagkit.attach"):
        assert f"| {row} |" in table
    for which in ("CFG+PAG(mid)", "PAG(mid)"):  # same seed, same latents: the tolerance of test_diffusers_reference
        expected = configs[f"{which} diffusers"]()
        assert (configs[f"{which} pagkit.attach"]() - expected).abs().max() < 1e-4
        assert (configs[f"{which} pagkit"]() - expected).abs().max() < 1e-4
    assert (configs["CFG 7.5 (diffusers)"]() - configs["CFG+PAG(mid) diffusers"]()).abs().max() > 1e-3  # not vacuous
    # attach with no terms runs the pipeline's own CFG batch through its wrapper: the pipeline's result, bit for bit
    assert torch.equal(configs["CFG 7.5 pagkit.attach, no terms"](), configs["CFG 7.5 (diffusers)"]())
    reading = bench.sd15_reading(results)
    assert reading.startswith(f"Target (issue 19): CFG+PAG(mid) ≤ {bench.SD15_TARGET:.2f}× CFG 7.5 on the same")
    ratio = results["CFG+PAG(mid) pagkit.attach"].median / results["CFG 7.5 (diffusers)"].median
    assert f"CFG+PAG(mid) pagkit.attach ÷ CFG 7.5 (diffusers) = {ratio:.2f}" in reading
    ratio = results["CFG+PAG(mid) pagkit"].median / results["CFG 7.5 pagkit"].median  # sample: its own loop
    assert f"CFG+PAG(mid) pagkit ÷ CFG 7.5 pagkit = {ratio:.2f}" in reading
    assert "PAG(mid) ÷ no guidance pagkit = " in reading and "CFG 7.5 pagkit.attach, no terms ÷" in reading
    assert "exact-result limit" not in reading  # only with the prefix's share
    share = bench.prefix_share(models.sd_unet(cross_attention_dim=24), side=8, text=7)
    assert 0 < share < 1
    third = results["CFG+PAG(mid) pagkit, no sharing"].median / results["CFG 7.5 pagkit"].median
    assert f"× (1 − {share:.2f}) = {1 + (third - 1) * (1 - share):.2f}," in bench.sd15_reading(results, share=share)


def _bench_gpu():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "docs" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_script_runs_small_on_cpu_and_writes_its_tables(tmp_path, capsys):
    out = tmp_path / "sub" / "bench_gpu.md"
    assert _bench_gpu().main(["--small", "--steps", "1", "--rounds", "1", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# `python docs/bench_gpu.py --small") and "Hardware: CPU" in text
    assert "torch " + torch.__version__ in text and "diffusers " in text and "torch.float32" in text
    for row in ("CFG 7.5 (diffusers)", "CFG+PAG(mid) diffusers", "CFG+PAG(mid) pagkit", "CFG+PAG(mid) pagkit.attach",
                "PAG(mid) diffusers", "PAG(mid) pagkit", "PAG(mid) pagkit.attach", "no guidance",
                "PAG(block 1 of 4) pagkit, no sharing", "PAG(block 1 of 4) pagkit"):
        assert f"| {row} |" in text, row
    assert "Target (issue 19): CFG+PAG(mid) ≤ 1.36× CFG 7.5 on the same sampling loop" in text
    assert [p.name for p in out.parent.iterdir()] == ["bench_gpu.md"]  # atomic: no temporary left


@pytest.mark.parametrize("argv, words", [
    (["--device", "cuda"], "--device cuda: CUDA is not available here"),
    (["--device", "tpu0"], "--device tpu0: not a torch device"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--out", "{tmp}"], "is a folder"),
])
def test_bench_gpu_script_refuses_bad_input_in_one_line(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = ["--out", str(tmp_path / "b.md")] if "--out" not in argv else []
    assert _bench_gpu().main(["--device", "cpu", *argv, *out] if "--device" not in argv else argv + out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_gpu: error: ") and words in err
    assert not (tmp_path / "b.md").exists()


# --- folding through pagkit.attach: the pipeline's own CFG rows ------------------------------------------------

SD_EMBEDS = [torch.randn(B, 7, 24, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
SD_LATENTS = torch.randn(B, 4, 16, 16, generator=torch.Generator().manual_seed(3))


def _sd_run(pipe, *terms, w=3.0, steps=5):
    emb, neg = SD_EMBEDS
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=neg, latents=SD_LATENTS.clone(), num_inference_steps=steps,
              guidance_scale=w, output_type="latent", height=32, width=32)
    if not terms:
        return pipe(**kw).images
    with pagkit.attach(pipe, *terms):
        return pipe(**kw).images


@pytest.mark.parametrize("term", [pagkit.PAG(2.0, layers="mid", fold=True),
                                  pagkit.SEG(1.0, layers="*", start=0.2, stop=0.6, fold=True)], ids=["pag", "seg-0.2-0.6"])
def test_fold_through_attach_is_sample_with_pagkit_cfg_at_cfg_cost(term):
    """attach(pipe, PAG(fold=True)) on a pipeline batching [∅; c]: its ∅ rows are perturbed, its own combination gives
    ε̂_u + w(ε_c − ε̂_u), exactly pagkit.sample's CFG(w) + PAG(fold=True); one model call of 2·B rows per step."""
    pipe, w, steps = models.sd_pipeline(), 3.0, 5
    unet = pipe.unet
    forwards = {n: vars(m).get("forward") for n, m in unet.named_modules()}
    rows = []
    handle = unet.conv_in.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))  # rows the UNet computes
    try:
        attached = _sd_run(pipe, term, w=w, steps=steps)
    finally:
        handle.remove()
    assert rows == [2 * B] * steps
    sampled = pagkit.sample(unet, models.ddim(), batch_size=B, num_inference_steps=steps, latents=SD_LATENTS,
                            guidance=[pagkit.CFG(w), term], encoder_hidden_states=SD_EMBEDS[0],
                            negative_encoder_hidden_states=SD_EMBEDS[1], progress_bar=False)
    torch.testing.assert_close(attached, sampled, rtol=1e-5, atol=1e-5)
    plain = _sd_run(pipe, w=w, steps=steps)
    assert (attached - plain).abs().max() > 1e-3  # the fold acted
    assert {n: vars(m).get("forward") for n, m in unet.named_modules()} == forwards  # restored
    assert torch.equal(_sd_run(pipe, w=w, steps=steps), plain)


def test_fold_through_attach_respects_its_interval():
    """Outside [start, stop) the step is the pipeline's plain CFG: a fold over the last 40% only equals, step for
    step, plain CFG for the first 60%."""
    pipe, steps = models.sd_pipeline(), 5
    seen = {}

    def recorder(name):
        def callback(pipe, i, t, tensors):
            seen.setdefault(name, []).append(tensors["latents"].clone())
            return tensors
        return callback
    emb, neg = SD_EMBEDS
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=3.0,
              output_type="latent", height=32, width=32)
    pipe(**kw, latents=SD_LATENTS.clone(), callback_on_step_end=recorder("plain"))
    with pagkit.attach(pipe, pagkit.PAG(2.0, layers="mid", start=0.6, fold=True)):
        pipe(**kw, latents=SD_LATENTS.clone(), callback_on_step_end=recorder("fold"))
    for i in range(3):  # steps 0, 1, 2: progress 0, 0.2, 0.4 < 0.6
        assert torch.equal(seen["fold"][i], seen["plain"][i])
    assert (seen["fold"][3] - seen["plain"][3]).abs().max() > 1e-4


def test_fold_through_attach_without_cfg_is_refused_before_the_first_step():
    pipe = models.sd_pipeline()
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"PAG\(fold=True\) perturbs the unconditional prediction of "
                                             r"StableDiffusionPipeline's own CFG, but this call runs no CFG"):
            _sd_run(pipe, pagkit.PAG(2.0, layers="mid", fold=True), w=1.0)
    finally:
        handle.remove()
    assert calls == []
    assert "forward" not in vars(pipe.unet)
    # a pipeline with no CFG at all (DDIMPipeline, no guidance_scale): refused at its first model call
    from diffusers import DDIMPipeline
    ddim = DDIMPipeline(unet=models.unet2d(), scheduler=models.ddim())
    ddim.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="this call runs no CFG"):
        with pagkit.attach(ddim, pagkit.PAG(2.0, layers="mid", fold=True)):
            ddim(batch_size=1, num_inference_steps=2, output_type="np")


def _flux_true_cfg(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=models.flux())
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 5, 24, generator=g), pooled_prompt_embeds=torch.randn(1, 12, generator=g),
              negative_prompt_embeds=torch.randn(1, 5, 24, generator=g),
              negative_pooled_prompt_embeds=torch.randn(1, 12, generator=g), true_cfg_scale=4.0, height=48, width=64,
              num_inference_steps=steps, output_type="latent")
    return pipe, kw, ["double.1", "single.0"], "images", {"true_cfg_scale": 1.0}


def _wan(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    import video_models
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=video_models.wan())
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
              height=32, width=48, num_frames=9, guidance_scale=5.0, num_inference_steps=steps, output_type="latent")
    return pipe, kw, "blocks.1", "frames", {"guidance_scale": 1.0}


@pytest.mark.parametrize("make", [_flux_true_cfg, _wan], ids=["flux-true-cfg", "wan"])
def test_fold_through_attach_perturbs_a_separate_uncond_call(make):
    """Flux's true_cfg_scale and Wan run ∅ as a second call (Wan names it "uncond" in a cache_context): that call is
    perturbed on all its rows, the conditional one runs plain and alone; the pipeline's ε̂_u + w(ε_c − ε̂_u) equals a
    hand-made transformer forward doing so. A call without CFG is refused before its first step."""
    from pagkit.backends import detect
    from pagkit.perturb import Identity
    steps = 3
    pipe, kw, layers, output, no_cfg = make(steps)
    pipe.set_progress_bar_config(disable=True)
    model, negative = pipe.transformer, kw["negative_prompt_embeds"]
    forward = type(model).forward.__get__(model)
    names = pagkit.resolve_layers(model, layers)

    def hand(*args, **call):  # the reference: the ∅ call (its text is the negative one) fully perturbed, ε_c plain
        call = inspect.signature(forward).bind(*args, **call).arguments
        call.update(call.pop("kwargs", {}) or {})
        call["return_dict"] = False
        if not torch.equal(call["encoder_hidden_states"], negative):
            return forward(**call)
        backend, x = detect(model), call["hidden_states"]
        with routed(model, names, backend) as router:
            router.info = backend.forward_info(model, x, call)
            router.plan = [Segment(0, x.shape[0], {n: Identity() for n in names})]
            return forward(**call)

    def run(*terms, model_forward=None):
        if model_forward is not None:
            model.forward = model_forward
        try:
            with pagkit.attach(pipe, *terms) if terms else torch.no_grad():
                return getattr(pipe(**kw, generator=torch.Generator().manual_seed(1)), output)
        finally:
            vars(model).pop("forward", None)

    calls = []

    def recording(*args, **call):  # what attach sends the model (attach wraps this forward)
        x = args[0] if args else call["hidden_states"]
        calls.append((x.shape[0], torch.equal(call["encoder_hidden_states"], negative)))
        return forward(*args, **call)
    recording.__wrapped__ = forward  # the model's signature, which attach binds

    expected = run(model_forward=hand)
    attached = run(pagkit.PAG(2.0, layers=layers, fold=True), model_forward=recording)
    assert calls == [(1, False), (1, True)] * steps  # c, then ∅: one row each, no extra rows
    torch.testing.assert_close(attached, expected, rtol=0, atol=1e-5)
    assert (attached - run()).abs().max() > 1e-3
    with pytest.raises(ValueError, match="this call runs no CFG"):  # no ∅ call to fold into
        with pagkit.attach(pipe, pagkit.PAG(2.0, layers=layers, fold=True)):
            pipe(**{**kw, **no_cfg})
