"""Sweeps: resumable without recomputation, identical under torchrun, and all their outputs written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

from pagkit import io
from pagkit.evaluate import Sweep, expand, fd_lines
from pagkit.metrics import FashionClassifier
from pagkit.train import unet_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-assets")
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**unet_config(False, "tiny")), scheduler=DDIMScheduler()).save_pretrained(
        root / "model")
    classifier = FashionClassifier(width=8)
    io.save_tensors(root / "classifier" / "model.safetensors", classifier.state_dict())
    io.write_json(root / "classifier" / "config.json", {"width": 8, "num_features": 128})
    return root


def _sweep(assets, out, **kw):
    configs = expand(str(assets / "model"), ["none", "pag"], scales=[2.0], layer_sets=[["down.1"]], steps=2,
                     num_samples=12)
    return Sweep(Path(out), configs, shard_size=4, classifier=str(assets / "classifier"), num_real=200,
                 progress=False, **kw)


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
                            "class_tv_distance", "seconds_per_image"}
    config = rows[1]["config"]
    assert config["method"] == "pag" and config["layers"] == ["down.1"] and config["scale"] == 2.0
    assert config["num_samples"] == 12 and config["scheduler"] == "ddim" and config["steps"] == 2


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
            str(assets / "classifier"), "--num-real", "200", "--threads", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "pagkit.cli", *args, "--out", str(tmp_path / "one")], check=True,
                   env=env, capture_output=True)
    result = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29617", "-m", "pagkit.cli", *args,
                             "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _metrics(tmp_path / "two") == _metrics(tmp_path / "one")


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
