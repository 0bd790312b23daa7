"""Restoration: operators (shape, adjoint, noise, gradients), DPS against plain sampling, resumable evaluation, CLI."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler
from PIL import Image

import models
import pagkit
from pagkit import io
from pagkit.cli import main
from pagkit.data import read_images
from pagkit.restore import (TASKS, GaussianBlur, MotionBlur, RandomInpaint, SuperResolution, dps, make_operator,
                            motion_kernel, restore_eval)

PAG = [pagkit.PAG(3.0, layers="down.1")]


def _image(shape=(3, 2, 16, 24), seed=0, dtype=torch.float64):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


@pytest.mark.parametrize("task", TASKS)
def test_operator_shapes(task):
    op = make_operator(task)
    x = _image()
    factor = {"sr2": 2, "sr4": 4}.get(task, 1)
    assert op(x).shape == (3, 2, 16 // factor, 24 // factor)
    assert op.degraded_image(op(x)).shape == x.shape
    assert op.observe(op(x)).shape == op(x).shape


@pytest.mark.parametrize("task", TASKS)
def test_adjoint(task):  # ⟨A x, y⟩ = ⟨x, Aᵀ y⟩ on a non-square image (each padded axis is checked)
    op = make_operator(task)
    x = _image()
    y = _image(op(x).shape, seed=1)
    lhs, rhs = (op(x) * y).sum(), (x * op.adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-5 * lhs.abs().clamp_min(1)


@pytest.mark.parametrize("task", TASKS)
def test_differentiable_with_gradient_the_adjoint(task):
    op = make_operator(task)
    x = _image(dtype=torch.float32).requires_grad_(True)
    w = _image(op(x).shape, seed=2, dtype=torch.float32)
    grad, = torch.autograd.grad((op(x) * w).sum(), x)
    torch.testing.assert_close(grad, op.adjoint(w), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_measurement_noise(task):
    x = _image((16, 1, 32, 32), dtype=torch.float32)
    exact = make_operator(task, noise_sigma=0.0)
    assert torch.equal(exact.measure(x, torch.Generator().manual_seed(0)), exact(x))
    op = make_operator(task, noise_sigma=0.1)
    y = op.measure(x, torch.Generator().manual_seed(0))
    assert torch.equal(y, op.measure(x, torch.Generator().manual_seed(0)))  # seeded: reproducible
    assert not torch.equal(y, op.measure(x, torch.Generator().manual_seed(1)))
    observed = op(torch.ones_like(x)) != 0  # inpainting: no noise where nothing is measured
    assert torch.equal(y[~observed], torch.zeros_like(y[~observed]))
    assert abs((y - op(x))[observed].std().item() - 0.1) < 0.01


def test_operator_parameters_are_checked():
    with pytest.raises(ValueError, match="unknown task 'deblur'; choose one of box-inpaint, random-inpaint"):
        make_operator("deblur")
    with pytest.raises(ValueError, match="takes no parameter sigma; its parameters: noise_sigma, size"):
        make_operator("box-inpaint", sigma=2.0)
    with pytest.raises(ValueError, match="its parameters: noise_sigma$"):
        make_operator("sr4", factor=2)  # sr2/sr4 fix their factor
    assert make_operator("box-inpaint", size=None).size is None  # None = the default
    for bad in (lambda: GaussianBlur(kernel_size=4), lambda: GaussianBlur(sigma=0), lambda: RandomInpaint(1.5),
                lambda: MotionBlur(intensity=2), lambda: SuperResolution(1),
                lambda: make_operator("sr2", noise_sigma=-1)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="not divisible by the factor 4"):
        SuperResolution(4)(torch.zeros(1, 1, 18, 18))
    with pytest.raises(ValueError, match="does not fit"):
        make_operator("box-inpaint", size=40)(torch.zeros(1, 1, 32, 32))


def test_box_and_motion_kernel():
    m = make_operator("box-inpaint")(torch.ones(1, 1, 32, 32))
    assert m[0, 0, 8:24, 8:24].sum() == 0 and m.sum() == 32 * 32 - 16 * 16
    k = motion_kernel(9, 0.5, seed=3)
    assert k.shape == (9, 9) and (k >= 0).all() and abs(k.sum().item() - 1) < 1e-12
    assert torch.equal(k, motion_kernel(9, 0.5, seed=3)) and not torch.equal(k, motion_kernel(9, 0.5, seed=4))
    assert (k > 0).sum() > 9  # a trajectory, not a point


def test_read_images_pads_small_and_shrinks_large(tmp_path):
    small = np.zeros((28, 28), dtype=np.uint8)
    small[10:18, 10:18] = 255
    Image.fromarray(small).save(tmp_path / "small.png")
    tiny = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    Image.fromarray(np.kron(tiny, np.ones((8, 8), dtype=np.uint8))).convert("RGB").save(tmp_path / "big.png")
    x = read_images([tmp_path / "small.png"], 1, (32, 32))
    assert x.shape == (1, 1, 32, 32) and x[0, 0, 12:20, 12:20].eq(1).all() and x.sum() == 64 - (32 * 32 - 64)
    y = read_images([tmp_path / "big.png"], 1, (4, 4))  # a nearest ×8 upscale, shrunk back exactly
    torch.testing.assert_close(y[0, 0], torch.from_numpy(tiny).float() / 127.5 - 1)
    assert read_images([tmp_path / "small.png"], 3, (32, 32)).shape == (1, 3, 32, 32)


@pytest.fixture(scope="module")
def unet():
    return models.unet2d()


def _measurement(task="box-inpaint", n=2):
    op = make_operator(task)
    return op, op.measure(_image((n, 1, 16, 16), dtype=torch.float32), torch.Generator().manual_seed(5))


@pytest.mark.parametrize("scheduler, eta", [(models.ddim, 0.0), (models.ddim, 1.0),
                                            (lambda: DDPMScheduler(clip_sample=False), 1.0)])
def test_dps_without_data_consistency_or_guidance_is_plain_sampling(unet, scheduler, eta):
    op, y = _measurement()
    restored = dps(unet, scheduler(), op, y, step_size=0.0, num_inference_steps=4, eta=eta,
                   generator=torch.Generator().manual_seed(1), progress_bar=False)
    sampled = pagkit.sample(unet, scheduler(), batch_size=2, num_inference_steps=4, eta=eta,
                            generator=torch.Generator().manual_seed(1), progress_bar=False)
    assert torch.equal(restored, sampled)


def test_dps_is_reproducible_and_pag_and_data_consistency_matter(unet):
    op, y = _measurement("gaussian-deblur")

    def run(step_size, guidance=()):
        return dps(unet, models.ddim(), op, y, guidance=guidance, step_size=step_size, num_inference_steps=4,
                   generator=torch.Generator().manual_seed(1), progress_bar=False)
    with_pag = run(1.0, PAG)
    assert torch.equal(with_pag, run(1.0, PAG))
    plain, consistent = run(0.0), run(1.0)
    assert not torch.allclose(with_pag, consistent, atol=1e-3)

    def residual(x):
        return (y - op(x)).flatten(1).norm(dim=1)
    assert (residual(consistent) < residual(plain)).all()


def test_dps_gradient_is_per_image(unet):  # Σ_b ‖·‖: an image's restoration ignores the rest of its batch
    op, y = _measurement("sr2", n=3)
    latents = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(guidance=PAG, step_size=2.0, num_inference_steps=3, eta=0.0, progress_bar=False)
    batch = dps(unet, models.ddim(), op, y, latents=latents, **kw)
    alone = dps(unet, models.ddim(), op, y[1:2], latents=latents[1:2], **kw)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="y has shape"):
        dps(unet, models.ddim(), op, y[:, :, :4], latents=latents, **kw)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("restore-inputs")
    DDPMPipeline(unet=models.unet2d(), scheduler=DDIMScheduler()).save_pretrained(root / "model16")
    rng = np.random.default_rng(0)  # a 28×28 grayscale and a 20×20 RGB input
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / "in0.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "in1.png")
    return root


def _eval(assets, out, pag_scale=3.0, **kw):
    return restore_eval("box-inpaint", out, methods={"dps": [], "dps+pag": [pagkit.PAG(pag_scale, layers="down.1")]},
                        model=str(assets / "model"), num_images=6, batch_size=4, num_inference_steps=2,
                        step_size=1.0, classifier=str(assets / "classifier"), num_real=200, progress=False, **kw)


def _metrics(out):
    return {(r["task"], r["method"]): {k: v for k, v in r["metrics"].items() if k != "seconds_per_image"}
            for r in json.loads((out / "metrics.json").read_text())}


def test_restore_eval_resumes_without_recomputing(assets, tmp_path):
    rows = _eval(assets, tmp_path / "straight")
    assert [r["method"] for r in rows] == ["dps", "dps+pag"]
    assert set(rows[1]["metrics"]) >= {"psnr", "ssim", "fd", "psnr_std", "ssim_std", "n", "seconds_per_image"}
    assert rows[1]["metrics"]["n"] == 6 and rows[1]["operator"]["noise_sigma"] == 0.05
    for name in ("grid.png", "metrics.md", "metrics.json"):
        assert (tmp_path / "straight" / name).is_file()
    assert len(list((tmp_path / "straight" / "grids").glob("*.png"))) == 1

    assert _eval(assets, tmp_path / "resumed", max_new_shards=2) == []  # killed after 2 of 4 shards
    shards = sorted((tmp_path / "resumed" / "shards").rglob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    assert len(shards) == 2
    _eval(assets, tmp_path / "resumed")
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished shards were not redone
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "straight")
    results = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed" / "results").glob("*.json")}
    _eval(assets, tmp_path / "resumed")  # finished: nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed" / "results").glob("*.json")} == results
    with pytest.raises(ValueError, match="other settings \\(guidance, guidance_label\\)"):
        _eval(assets, tmp_path / "resumed", pag_scale=2.0)


def test_cli_restores_inputs_and_writes_grid_and_metrics(inputs, tmp_path, capsys):
    common = ["--input", str(inputs / "in0.png"), str(inputs / "in1.png"), "--model", str(inputs / "model16"),
              "--steps", "2", "--pag-layers", "down.1", "--quiet"]
    assert main(["restore", "--task", "sr2", *common, "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "| sr2 | dps |" in printed and "| sr2 | dps+pag |" in printed
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert [m["method"] for m in metrics] == ["dps", "dps+pag"] and metrics[0]["metrics"]["n"] == 2
    zoom, pad, label_width = 3, 2, 190
    assert Image.open(tmp_path / "a" / "grid.png").size == (label_width + 2 * (16 * zoom + pad) + pad,
                                                            4 * (16 * zoom + pad) + pad)
    # already degraded inputs: no originals row, no metrics
    assert main(["restore", "--task", "sr4", "--degraded", *common, "--out", str(tmp_path / "b")]) == 0
    assert Image.open(tmp_path / "b" / "grid.png").size[1] == 3 * (16 * zoom + pad) + pad
    assert not (tmp_path / "b" / "metrics.json").exists()


def test_cli_test_images(assets, tmp_path, capsys):
    assert main(["restore", "--task", "gaussian-deblur", "--test-images", "3", "--model", str(assets / "model"),
                 "--steps", "2", "--pag-layers", "down.1", "--classifier", str(assets / "classifier"),
                 "--num-real", "100", "--blur-sigma", "1.0", "--quiet", "--out", str(tmp_path)]) == 0
    assert "| gaussian-deblur | dps+pag |" in capsys.readouterr().out
    (result,) = [p for p in (tmp_path / "results").glob("*.json") if p.name.endswith("dps+pag.json")]
    assert "gaussian-deblur-sigma1_" in result.name and io.read_json(result)["operator"]["sigma"] == 1.0


def test_cli_dps_alone_then_with_pag_shares_the_dps_rows_and_first_image_picks_a_split(assets, tmp_path):
    common = ["restore", "--task", "box-inpaint", "--test-images", "2", "--model", str(assets / "model"),
              "--steps", "2", "--pag-layers", "down.1", "--classifier", str(assets / "classifier"),
              "--num-real", "100", "--quiet", "--out", str(tmp_path)]
    assert main([*common, "--pag-scale", "0"]) == 0  # DPS alone
    (dps,) = (tmp_path / "results").glob("*.json")
    stamp = dps.stat().st_mtime_ns
    assert main(common) == 0  # + PAG: the DPS row is reused, not redone
    assert dps.stat().st_mtime_ns == stamp and len(list((tmp_path / "results").glob("*.json"))) == 2
    assert main([*common, "--first-image", "5"]) == 0  # test images 5-6: another run, other originals
    split = sorted((tmp_path / "results").glob("*_from5_*dps.json"))
    assert len(split) == 1 and io.read_json(split[0])["first_image"] == 5
    assert io.read_json(split[0])["metrics"]["psnr"] != io.read_json(dps)["metrics"]["psnr"]
    assert main([*common, "--first-image", "9999"]) == 2  # only one test image left from there


@pytest.mark.parametrize("argv, message", [
    (["--task", "deblur", "--test-images", "2"], "argument --task: invalid choice: 'deblur'"),
    (["--task", "sr2", "--input", "/no/such.png"], "no such input image: /no/such.png"),
    (["--task", "box-inpaint", "--test-images", "2", "--degraded"], "--degraded describes --input images"),
    (["--task", "box-inpaint", "--test-images", "2", "--blur-sigma", "2"], "takes no parameter sigma"),
])
def test_cli_bad_input_is_one_line_exit_2(inputs, argv, message, capsys):
    try:  # in-process (a subprocess costs seconds of imports): an escaping exception fails the test
        code = main(["restore", *argv, "--model", str(inputs / "model16")])
    except SystemExit as stop:  # argparse's errors
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
