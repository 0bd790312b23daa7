import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline
from PIL import Image

import models
from pagkit import io
from pagkit.cli import build_parser, eval_configs, main
from pagkit.train import TrainConfig, train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    DDPMPipeline(unet=models.unet2d(), scheduler=DDIMScheduler()).save_pretrained(path)
    return path


def test_layers_command_prints_names_grids_and_aliases(model_dir, capsys):
    assert main(["layers", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "UNet2DModel (unet backend): 7 attention sites (7 self)" in out
    assert "down_blocks.1.attentions.0" in out and "8x8" in out
    assert "up.0         2 layers" in out


def test_sample_command_writes_a_labelled_grid(model_dir, tmp_path, capsys):
    out_png = tmp_path / "grid.png"
    assert main(["sample", "--model", str(model_dir), "--steps", "2", "--num-images", "3", "--quiet",
                 "--pag-layers", "down.1", "--out", str(out_png)]) == 0
    printed = capsys.readouterr().out
    for row in ("no guidance", "PAG s=0.5", "SEG g=1 sigma=inf", "SAG s=0.75"):  # the defaults
        assert row in printed
    image = Image.open(out_png)
    zoom, pad, label_width = 3, 2, 190
    assert image.size == (label_width + 3 * (16 * zoom + pad) + pad, 4 * (16 * zoom + pad) + pad)


def test_sample_scale_strip_adds_one_row_per_scale_and_its_zero_is_the_unguided_row(model_dir, tmp_path, capsys):
    """--strip 0,2 (what ./run demo does with 0,0.5,1,2,3): two more rows of PAG on --pag-layers; s = 0 is neutral,
    so its tiles are the unguided row's exactly."""
    out_png = tmp_path / "grid.png"
    assert main(["sample", "--model", str(model_dir), "--steps", "2", "--num-images", "3", "--quiet",
                 "--pag-layers", "down.1", "--strip", "0,2", "--out", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "strip: PAG s=0 down.1" in printed and "strip: PAG s=2 down.1" in printed and "(6 rows" in printed
    grid = torch.tensor(list(Image.open(out_png).convert("L").getdata())).view(Image.open(out_png).size[::-1])
    row = 16 * 3 + 2
    tiles = [grid[2 + i * row:2 + i * row + 48, 190:] for i in range(6)]
    assert torch.equal(tiles[4], tiles[0]) and not torch.equal(tiles[5], tiles[0])


def test_eval_sweeps_sag_over_its_layers_one_at_a_time():
    args = build_parser().parse_args(["eval", "--methods", "none,sag", "--sag-layers", "down.1,mid", "--intervals",
                                      "0:0.5,0.5:1", "--out", "unused"])
    sag = [(c.layers, c.start, c.stop) for c in eval_configs(args) if c.method == "sag"]
    assert sag == [(("down.1",), 0.0, 0.5), (("down.1",), 0.5, 1.0), (("mid",), 0.0, 0.5), (("mid",), 0.5, 1.0)]
    old_spelling = build_parser().parse_args(["eval", "--methods", "sag", "--sag-layer", "mid", "--out", "unused"])
    assert [c.layers for c in eval_configs(old_spelling)] == [("mid",)]


def test_restore_has_one_option_per_operator_parameter():
    """OPERATOR_OPTIONS is the one table: every make_operator parameter of every task has its flag, and no more."""
    from pagkit.cli.restore import OPERATOR_OPTIONS
    from pagkit.restore import TASKS, task_parameters
    assert sorted(o.parameter for o in OPERATOR_OPTIONS) == sorted({p for t in TASKS for p in task_parameters(t)})
    args = build_parser().parse_args(["restore", "--task", "motion-deblur", "--test-images", "1",
                                      "--motion-intensity", "0.25", "--operator-seed", "3"])
    assert (args.motion_intensity, args.operator_seed, args.kernel_size) == (0.25, 3, None)


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model", "/no/such/model"], "model '/no/such/model' not found"),
    (["sample", "--steps", "-2"], "argument --steps: expected a positive integer, got -2"),
    (["sample", "--pag-layers", "mid_blok"], "unknown layer 'mid_blok'"),
    (["layers", "/no/such/model"], "not found"),
    (["eval", "--methods", "sag", "--sag-layers", "mid,mid_blok", "--out", "unused"], "unknown layer 'mid_blok'"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(argv, message):
    result = subprocess.run([sys.executable, "-m", "pagkit.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_training_resumes_exactly_from_its_checkpoint(tmp_path):
    common = dict(size="tiny", batch_size=8, max_steps=4, warmup_steps=2, checkpoint_every=2, milestones=(1.0,))
    straight = train(TrainConfig(out=str(tmp_path / "straight"), **common))
    # a run cut short after its first step (time budget 0), then started again, must end where the straight one did
    train(TrainConfig(out=str(tmp_path / "resumed"), time_budget_min=0.0, **common))
    assert io.read_json(tmp_path / "resumed" / "checkpoint" / "state.json")["step"] == 1
    resumed = train(TrainConfig(out=str(tmp_path / "resumed"), **common))
    a = io.load_tensors(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = io.load_tensors(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = io.read_json(tmp_path / "resumed" / "summary.json")
    assert summary["steps"] == 4 and summary["images_seen"] == 32 and summary["finished"]


def test_stop_at_step_gives_the_full_runs_snapshot_exports_it_and_resumes_to_the_end(tmp_path, monkeypatch):
    """The weak model for autoguidance (fmnist-weak): a run stopped at its 25% milestone has the uninterrupted
    run's ema-25pct, bit for bit (same data order, lr schedule on max_steps, EMA); exported with its card, it is
    found as a shipped model; run again without the stop, it ends where the uninterrupted run did."""
    from pagkit import load
    from pagkit.train import export_model

    def weights(folder):
        return io.load_tensors(folder / "unet" / "diffusion_pytorch_model.safetensors")

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    common = dict(size="tiny", batch_size=8, max_steps=8, warmup_steps=2, checkpoint_every=4, milestones=(0.25, 1.0))
    full = train(TrainConfig(out=str(tmp_path / "full"), **common))
    stopped = train(TrainConfig(out=str(tmp_path / "weak"), stop_at_step=2, **common))
    snapshot = weights(tmp_path / "weak" / "ema-25pct")
    assert same(weights(tmp_path / "full" / "ema-25pct"), snapshot)
    assert same(weights(stopped), snapshot) and not same(weights(full), snapshot)
    assert io.read_json(tmp_path / "weak" / "checkpoint" / "state.json")["step"] == 2
    summary = io.read_json(tmp_path / "weak" / "summary.json")
    assert summary["steps"] == 2 and not summary["finished"]

    shipped = tmp_path / "models"
    with pytest.raises(ValueError, match="has not finished"):
        export_model(tmp_path / "weak", shipped / "fmnist-weak", command="train")
    with pytest.raises(ValueError, match="no EMA snapshot 'ema-50pct' \\(snapshots: ema-25pct\\)"):
        export_model(tmp_path / "weak", shipped / "fmnist-weak", command="train", snapshot="ema-50pct")
    monkeypatch.setattr(load, "SHIPPED_DIR", shipped)
    with pytest.raises(FileNotFoundError, match="fmnist-weak is the fmnist run.s EMA snapshot.*--stop-at-step 1500"):
        load.load_model("fmnist-weak")
    export_model(tmp_path / "weak", shipped / "fmnist-weak", command="train --stop-at-step 2", snapshot="ema-25pct")
    card = io.read_json(shipped / "fmnist-weak" / "card.json")
    assert (card["steps"], card["images_seen"]) == (2, 16) and card["final_loss"] and card["training_seconds"] >= 0
    assert card["snapshot"] == {"name": "ema-25pct", "step": 2, "fraction": 0.25, "max_steps": 8}
    assert not (shipped / "fmnist-weak" / "snapshot.json").exists()
    assert list(load.shipped_models()) == ["fmnist-weak"]
    model = load.load_model("fmnist-weak")
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())

    resumed = train(TrainConfig(out=str(tmp_path / "weak"), **common))
    assert same(weights(resumed), weights(full))
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match="stop_at_step must be an integer in \\[1, max_steps=8\\]"):
            TrainConfig(out="x", max_steps=8, stop_at_step=bad)
