"""Sweeps: resumable without recomputation, identical under torchrun, and all their outputs written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pagkit.evaluate import EvalConfig, Sweep, expand, fd_change_maps, fd_lines, write_tables
from pagkit.load import load_scheduler


def _sweep(assets, out, **kw):
    configs = expand(str(assets / "model"), ["none", "pag"], scales=[2.0], layer_sets=[["down.1"]], steps=2,
                     num_samples=12)
    return Sweep(Path(out), configs, shard_size=4, classifier=str(assets / "classifier"),
                 classifier_b=str(assets / "classifier-b"), num_real=200, progress=False, **kw)


def _metrics(out):
    rows = json.loads((Path(out) / "results.json").read_text())
    return {r["key"]: {k: v for k, v in r["metrics"].items() if k != "seconds_per_image"} for r in rows}


def test_sweep_writes_every_output(assets, tmp_path):
    rows = _sweep(assets, tmp_path / "a").run()
    assert len(rows) == 2
    for name in ("results.csv", "results.json", "results.md", "plots/fd_vs_scale.png", "plots/precision_recall.png"):
        assert (tmp_path / "a" / name).is_file(), name
    assert len(list((tmp_path / "a" / "grids").glob("*.png"))) == 2
    metrics = rows[1]["metrics"]
    assert set(metrics) >= {"fd", "kid", "is", "precision", "recall", "mean_pixel", "class_histogram",
                            "class_tv_distance", "seconds_per_image", "fd_b", "kid_b", "kid_std_b"}
    assert metrics["fd_b"] > 0 and metrics["fd_b"] != metrics["fd"]  # the second network's own features
    space = json.loads((tmp_path / "a" / "feature_space.json").read_text())
    assert space["features"] == "classifier:classifier" and space["features_b"] == "classifier:classifier-b"
    assert "FD (b)" in (tmp_path / "a" / "results.md").read_text()
    config = rows[1]["config"]
    assert config["method"] == "pag" and config["layers"] == ["down.1"] and config["scale"] == 2.0
    assert config["num_samples"] == 12 and config["scheduler"] == "ddim" and config["steps"] == 2


def test_a_configuration_whose_guidance_goes_non_finite_is_recorded_as_failed(assets, tmp_path, monkeypatch):
    from pagkit.denoise import NonFiniteGuidance
    sweep = _sweep(assets, tmp_path / "a")
    guided = next(c for c in sweep.configs if c.method == "pag")
    made = []
    plain = Sweep.make_shard

    def make_shard(self, config, k):
        if config == guided and k == 1:
            raise NonFiniteGuidance("guidance made the prediction NaN/inf at the step with t=500")
        made.append((config.method, k))
        return plain(self, config, k)

    monkeypatch.setattr(Sweep, "make_shard", make_shard)
    rows = sweep.run()
    assert made == [("none", 0), ("none", 1), ("none", 2), ("pag", 0)]  # nothing more made for the failed one
    failed = json.loads(sweep.result_path(guided).read_text())
    assert "metrics" not in failed and "NaN/inf at the step with t=500" in failed["failed"]
    assert [("failed" in r) for r in rows] == [False, True]
    md = (tmp_path / "a" / "results.md").read_text()
    assert md.count("| none |") == 1 and "| pag |" not in md and f"- `{guided.key}`: guidance made" in md
    made.clear()
    sweep.run()  # run again: the failure is a finished result, not retried
    assert made == []


def test_killed_sweep_resumes_without_recomputing(assets, tmp_path):
    _sweep(assets, tmp_path / "straight").run()
    killed = _sweep(assets, tmp_path / "resumed", max_new_shards=4)
    assert killed.run() == []
    shards = sorted((tmp_path / "resumed" / "shards").rglob("*.safetensors"))
    assert len(shards) == 4
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    _sweep(assets, tmp_path / "resumed").run()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished shards were not redone
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "straight")
    # and a finished sweep run again recomputes nothing at all
    before = (tmp_path / "resumed" / "results.json").stat().st_mtime_ns
    results_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed" / "results").glob("*.json")}
    _sweep(assets, tmp_path / "resumed").run()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed" / "results").glob("*.json")} == results_before
    assert before > 0


def test_two_process_torchrun_equals_one_process(assets, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    args = ["eval", "--model", str(assets / "model"), "--methods", "none,pag", "--scales", "2", "--layers",
            "down.1", "--steps", "2", "--num-samples", "12", "--shard-size", "4", "--classifier",
            str(assets / "classifier"), "--classifier-b", str(assets / "classifier-b"), "--num-real", "200",
            "--threads", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "pagkit.cli", *args, "--out", str(tmp_path / "one")], check=True,
                   env=env, capture_output=True)
    result = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29617", "-m", "pagkit.cli", *args,
                             "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _metrics(tmp_path / "two") == _metrics(tmp_path / "one")


def test_a_torchrun_world_on_a_locked_out_is_refused_on_every_rank_without_waiting(assets, tmp_path):
    """Rank 0 is refused the lock another run holds: every rank exits with the message (none is left at a
    barrier for the default 30-minute gloo timeout), and nothing is written."""
    from pagkit import io
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "held"
    args = ["eval", "--model", str(assets / "model"), "--methods", "none", "--steps", "2", "--num-samples", "4",
            "--classifier", str(assets / "classifier"), "--num-real", "100", "--threads", "1", "--quiet"]
    with io.run_lock(out):
        result = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29619", "-m", "pagkit.cli",
                                 *args, "--out", str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert result.stderr.count("is in use by another pagkit run") >= 2, result.stderr[-2000:]  # both ranks
    assert "exitcode  : 2" in result.stderr and "pagkit/" not in result.stderr  # torchrun's own report only
    assert sorted(p.name for p in out.iterdir()) == [io.LOCK_NAME]


def _row(method, scale, fd, seed_set=0, **config):
    row = dict(model="m", method=method, cfg_scale=1.0, scale=scale, layers="down.2" if scale else "",
               perturbation="identity", sigma="inf", start=0.0, stop=1.0, scheduler="ddim", steps=20,
               num_samples=500, seed_set=seed_set, fd=fd)
    return {**row, **config}


def test_fd_plot_lines_average_seed_sets_and_start_at_the_matching_baseline():
    flat = [_row("none", 0, 10.0, 1), _row("none", 0, 12.0, 2),
            _row("pag", 1, 8.0, 1), _row("pag", 1, 9.0, 2), _row("pag", 2, 7.0, 1),
            _row("seg", 1, 5.0, sigma="2.0", layers="mid"), _row("seg", 1, 6.0, sigma="inf", layers="mid"),
            _row("none", 0, 99.0, scheduler="ddpm", steps=100),  # another sampler: never a baseline here
            _row("cfg", 0, 4.0, cfg_scale=3.0), _row("cfg+pag", 1, 3.0, cfg_scale=3.0)]
    lines = fd_lines(flat)
    assert lines["pag down.2"] == [(0.0, 11.0, 1.0), (1, 8.5, 0.5), (2, 7.0, 0.0)]
    assert lines["seg mid σ=2.0"] == [(0.0, 11.0, 1.0), (1, 5.0, 0.0)]
    assert lines["seg mid σ=inf"][1:] == [(1, 6.0, 0.0)]
    assert lines["cfg+pag down.2 w=3"] == [(0.0, 4.0, 0.0), (1, 3.0, 0.0)]
    assert len(lines) == 4


def test_inception_sweeps_record_no_second_network(tmp_path):
    weights = tmp_path / "inception.safetensors"
    weights.write_bytes(b"")  # only its name is read here
    sweep = Sweep(tmp_path / "o", [], inception=str(weights), classifier_b="unused")
    assert not sweep.measures_b and "features_b" not in sweep.feature_space()
    assert Sweep(tmp_path / "o", []).feature_space()["features_b"] == "classifier:fmnist-classifier-b"


def test_default_keys_are_unchanged_and_spacing_enters_the_key_only_when_not_the_default(assets):
    # keys of results made before --timestep-spacing existed (the map's rows)
    assert EvalConfig("fmnist", "none", num_samples=500).key == "fmnist_none_ddim20_n500_seed0"
    assert (EvalConfig("fmnist", "pag", scale=0.5, layers=("down.2",), num_samples=500).key
            == "fmnist_pag_s0.5_Ldown.2_ddim20_n500_seed0")
    assert (EvalConfig("fmnist", "seg", scale=1.0, layers=("mid",), num_samples=500, seed_set=1).key
            == "fmnist_seg_s1_Lmid_sigmainf_ddim20_n500_seed1")
    model = str(assets / "model")  # its scheduler config: DDIM's default spacing, leading
    kw = dict(scales=[1.0], layer_sets=[["down.1"]], steps=20, num_samples=500)
    default = [c.key for c in expand(model, ["none", "pag"], **kw)]
    assert [c.key for c in expand(model, ["none", "pag"], timestep_spacing="leading", **kw)] == default
    trailing = expand(model, ["none", "pag"], timestep_spacing="trailing", **kw)
    assert [c.key for c in trailing] == [k.replace("ddim20", "ddim20-trailing") for k in default]
    scheduler = load_scheduler(model, "ddim", trailing[0].timestep_spacing)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps[0] == 999
    leading = load_scheduler(model, "ddim")
    leading.set_timesteps(20)
    assert leading.timesteps[0] == 950
    with pytest.raises(ValueError, match="timestep spacing"):
        expand(model, ["none"], timestep_spacing="sideways")


def _result(method, scale, layers, fd, fd_b=None, seed_set=0, **config):
    c = dict(model="m", method=method, cfg_scale=1.0, scale=scale, layers=layers, perturbation="identity",
             sigma="inf", start=0.0, stop=1.0, scheduler="ddim", steps=20, num_samples=500, seed_set=seed_set)
    m = dict(fd=fd, kid=0.01, is_=0, precision=0.5, recall=0.5, mean_pixel=0.0, class_tv_distance=0.1,
             seconds_per_image=0.1, fd_b=fd_b, kid_b=None if fd_b is None else 0.02)
    m["is"] = m.pop("is_")
    c.update(config)
    return {"key": f"{method}{scale}{'+'.join(layers)}{seed_set}{config}", "config": c, "metrics": m}


def test_heat_map_matrix_is_fd_change_in_percent_against_the_same_sampling():
    from pagkit.evaluate import flatten
    rows = [_result("none", 0, [], 40.0, 20.0), _result("none", 0, [], 50.0, seed_set=1),
            _result("none", 0, [], 10.0, steps=50),  # another sampling: never this map's baseline
            _result("pag", 1, ["mid"], 36.0, 21.0), _result("pag", 1, ["mid"], 55.0, seed_set=1),
            _result("pag", 2, ["mid"], 44.0, 19.0), _result("pag", 1, ["down.2"], 38.0),
            _result("pag", 1, ["mid", "down.2"], 30.0),
            _result("seg", 1, ["mid"], 30.0), _result("seg", 2, ["mid"], 30.0),  # one site only: no SEG map
            _result("pag", 1, ["mid"], 9.0, steps=50), _result("pag", 2, ["down.2"], 9.0, steps=50)]
    maps = fd_change_maps(flatten(rows))
    assert len(maps) == 2  # PAG under DDIM-20 and PAG under DDIM-50; SEG has one site
    m = maps[0]
    assert m["method"] == "pag" and m["sites"] == ["mid", "down.2", "mid+down.2"] and m["scales"] == [1, 2]
    # mid s=1: seed set 0 -10%, seed set 1 +10% -> mean 0
    assert m["change"] == [[pytest.approx(0.0), pytest.approx(10.0)], [pytest.approx(-5.0), None],
                           [pytest.approx(-25.0), None]]
    assert maps[1]["change"] == [[pytest.approx(-10.0), None], [None, pytest.approx(-10.0)]]
    b = fd_change_maps(flatten(rows), "fd_b")  # rows without fd_b drop out
    assert b == []  # only mid has fd_b: one site
    rows.append(_result("pag", 1, ["down.2"], 38.0, 18.0))
    b = fd_change_maps(flatten(rows), "fd_b")
    assert b[0]["sites"] == ["mid", "down.2"] and b[0]["change"][1] == [pytest.approx(-10.0), None]


def test_write_tables_draws_one_heat_map_per_method_covering_sites_and_scales(tmp_path):
    rows = [_result("none", 0, [], 40.0, 20.0)]
    rows += [_result(method, s, [site], 40.0 + s - i, 20.0) for method in ("pag", "seg") for s in (0.5, 1.0)
             for i, site in enumerate(("mid", "down.2"))]
    rows.append(_result("sag", 1.0, ["mid"], 41.0, 20.0))
    write_tables(tmp_path, rows)
    assert sorted(p.name for p in (tmp_path / "plots").glob("heatmap_*.png")) == ["heatmap_pag.png",
                                                                                 "heatmap_seg.png"]
    write_tables(tmp_path / "small", rows[:3])  # one site: no heat map
    assert not list((tmp_path / "small" / "plots").glob("heatmap_*.png"))


def test_selection_rule_needs_both_networks_and_breaks_ties_towards_the_smaller_scale():
    from pagkit.evaluate import choose_settings, flatten
    rows = [_result("none", 0, [], 40.0, 20.0),
            _result("pag", 1.0, ["mid"], 36.0, 19.0),      # -10%, -5%   -> mean -7.5
            _result("pag", 0.5, ["down.2"], 36.4, 19.0),   # -9%,  -5%   -> mean -7.0: ties (within 1 pp), smaller s
            _result("pag", 2.0, ["mid"], 30.0, 20.4),      # -25%, +2%   -> not eligible (b rises)
            _result("pag", 1.5, ["up.0"], 39.0, 16.0),     # -2.5%, -20% -> mean -11.25: the best score
            _result("pag", 0.25, ["up.1"], 41.0, 10.0),    # +2.5%, -50% -> not eligible (a rises)
            _result("seg", 1.0, ["mid"], 42.0, 19.0),      # +5%, -5%: nothing lowers both
            _result("sag", 1.0, ["mid"], 30.0, 10.0)]      # not a chosen method
    picks = choose_settings(flatten(rows))
    pag = picks["pag"]
    assert pag["chosen"]["layers"] == "up.0" and pag["score"] == pytest.approx(-11.25)
    assert pag["best_a"]["layers"] == "mid" and pag["best_a"]["scale"] == 2.0  # a alone: -25%
    assert pag["best_b"]["layers"] == "up.1" and not pag["agree"]
    assert pag["candidates"] == 5 and pag["eligible"] == 3
    assert picks["seg"]["chosen"] is None and picks["seg"]["eligible"] == 0
    # without the up.0 row the two -7.5 / -7.0 settings tie: the smaller scale wins
    rows = [r for r in rows if r["config"]["layers"] != ["up.0"]]
    assert choose_settings(flatten(rows))["pag"]["chosen"]["layers"] == "down.2"
    # rows without the second network's FD are never candidates
    rows = [_result("none", 0, [], 40.0, 20.0), _result("pag", 1.0, ["mid"], 30.0)]
    assert choose_settings(flatten(rows))["pag"]["candidates"] == 0


@pytest.mark.parametrize("perturbation, exact_chunks", [("identity", True), ("mask", False)])
def test_a_shard_sampled_in_micro_batches_equals_the_whole_batch(assets, tmp_path, monkeypatch, perturbation,
                                                                  exact_chunks):
    """A shard larger than MICRO_BATCH is sampled in chunks only where that gives its samples (DDIM, no
    batch-shaped random draws): equal to one batch to float rounding; a mask perturbation keeps one batch."""
    import torch
    import pagkit.evaluate as evaluate
    from pagkit.load import load_model
    from pagkit.sample import sample
    from pagkit import runner
    sample_module = sys.modules["pagkit.sample"]  # make_shard imports its sample() from there when it runs
    configs = expand(str(assets / "model"), ["pag"], scales=[2.0], layer_sets=[["down.1"]], steps=2,
                     num_samples=7, perturbations=[perturbation])
    monkeypatch.setattr(evaluate, "MICRO_BATCH", 3)
    sweep = Sweep(tmp_path / "a", configs, shard_size=7, classifier=str(assets / "classifier"),
                  classifier_b=str(assets / "classifier-b"), num_real=200, progress=False)
    config = configs[0]
    assert evaluate._chunks_are_exact(config) is exact_chunks
    calls = []
    monkeypatch.setattr(sample_module, "sample", lambda *a, **kw: calls.append(kw["batch_size"]) or sample(*a, **kw))
    sweep.make_shard(config, 0)
    assert calls == ([3, 3, 1] if exact_chunks else [7])
    chunked = sweep.unit_images(config)
    model = load_model(str(assets / "model"))
    g = runner.generator(config.seed_set, 0)
    noise = torch.randn(7, model.config.in_channels, model.config.sample_size, model.config.sample_size, generator=g)
    whole = sample(model, load_scheduler(str(assets / "model"), "ddim"), batch_size=7, num_inference_steps=2,
                   guidance=config.terms(), latents=noise, generator=g, progress_bar=False).clamp(-1, 1)
    if exact_chunks:
        torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)  # float rounding (measured 1.2e-5)
    else:
        assert torch.equal(chunked, whole)
