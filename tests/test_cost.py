"""Cheaper variants of the contrast terms (issue 19): difference caching (``cache=k``) and folding into CFG's
unconditional branch (``fold=True``), on tiny random UNets, against reference loops written here with explicit
forwards (``routing.routed`` with one perturbed segment, as tests/test_methods.py does)."""
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
