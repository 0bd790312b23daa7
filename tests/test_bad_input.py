"""The bad-input corpus (issue 20): every CLI subcommand and the Python API, on each kind of bad input.

From the CLI: exit code 2, at most 3 lines on stderr naming the problem (with the valid choices where there
are any), no traceback, no partial output file. From the API: a ValueError/TypeError (subclass) with the same
message. Most cases run in-process (``pagkit.cli.main``); a few run in a subprocess to prove "no traceback"
where Python itself would print one.
"""
import errno
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMPipeline
from PIL import Image

import models
import pagkit
from pagkit import io
from pagkit.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, assets):
    root = tmp_path_factory.mktemp("bad-input")
    DDPMPipeline(unet=models.unet2d(), scheduler=DDIMScheduler()).save_pretrained(root / "model16")
    for name in ("model", "classifier", "classifier-b"):
        shutil.copytree(assets / name, root / name)
    weights = root / "model16" / "unet" / "diffusion_pytorch_model.safetensors"
    for damage, data in (("random", bytes(range(256)) * 4), ("truncated", weights.read_bytes()[:5000]),
                         ("empty", b"")):
        shutil.copytree(root / "model16" / "unet", root / damage)
        (root / damage / "diffusion_pytorch_model.safetensors").write_bytes(data)
    (root / "pickled").mkdir()  # a model folder with only pickled weights
    shutil.copy(root / "model16" / "unet" / "config.json", root / "pickled" / "config.json")
    (root / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really")
    for suffix in (".bin", ".ckpt", ".pt"):
        (root / f"weights{suffix}").write_bytes(b"\x80\x04not really")
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2).save_pretrained(root / "vae")
    (root / "empty-folder").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "ok.png")
    Image.fromarray(rng.integers(0, 256, (64, 20), dtype=np.uint8)).save(root / "tall.png")  # another aspect
    Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).save(root / "tiny.png")
    (root / "text.png").write_text("not an image")
    (root / "truncated.png").write_bytes((root / "ok.png").read_bytes()[:40])
    (root / "a-file").write_text("x")
    return root


def _run(argv):
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's errors
        return stop.code


# (id, argv with {F} = the files, {OUT} = a fresh output path, message on stderr)
M16 = ["--model", "{F}/model16"]
RESTORE = ["restore", "--task", "sr2", *M16, "--steps", "1", "--quiet", "--out", "{OUT}"]
TEST_IMAGES = ["restore", "--task", "box-inpaint", "--test-images", "2", "--model", "{F}/model", "--classifier",
               "{F}/classifier", "--num-real", "50", "--steps", "1", "--quiet"]
EVAL = ["eval", "--model", "{F}/model", "--layers", "down.1", "--steps", "1", "--num-samples", "2",
        "--classifier", "{F}/classifier", "--classifier-b", "{F}/classifier-b", "--num-real", "50", "--quiet"]
TRAIN = ["train", "--size", "tiny", "--max-steps", "1", "--batch-size", "4"]
TUNE = ["tune", "--model", "{F}/model", "--method", "pag", "--budget", "400", "--layers", "down.1;mid", "--scales",
        "1,2", "--intervals", "0:1", "--shard-size", "2", "--steps", "1", "--classifier", "{F}/classifier",
        "--classifier-b", "{F}/classifier-b", "--num-real", "50", "--quiet"]
CASES = [
    # weights: missing, corrupt, truncated, empty, pickled, a file, the wrong class
    ("sample-missing", ["sample", "--model", "{F}/nope"], "model '{F}/nope' not found"),
    ("sample-corrupt", ["sample", "--model", "{F}/random", "--steps", "1"], "is not a readable safetensors file"),
    ("sample-truncated", ["sample", "--model", "{F}/truncated"], "corrupt or truncated"),
    ("layers-empty-weights", ["layers", "{F}/empty"], "is not a readable safetensors file"),
    ("layers-pickled-folder", ["layers", "{F}/pickled"], "holds only pickled weights (diffusion_pytorch_model.bin); "
                                                        "pagkit never unpickles"),
    ("layers-bin-file", ["layers", "{F}/weights.bin"], "is a pickled .bin file; pagkit never unpickles"),
    ("sample-ckpt-file", ["sample", "--model", "{F}/weights.ckpt"], "is a pickled .ckpt file; pagkit never unpickles"),
    ("eval-pt-file", [*EVAL, "--model", "{F}/weights.pt", "--out", "{OUT}"], "pagkit never unpickles"),
    ("restore-pickled", [*RESTORE, "--input", "{F}/ok.png", "--model", "{F}/pickled"], "pagkit never unpickles"),
    ("eval-inception-ckpt", [*EVAL, "--inception", "{F}/weights.ckpt", "--out", "{OUT}"],
     "read from .safetensors only (pagkit never unpickles)"),
    ("layers-no-model", ["layers", "{F}/empty-folder"], "holds no diffusers model: expected config.json"),
    ("layers-classifier-folder", ["layers", "{F}/classifier"], "names no model class (_class_name): not a diffusers "
                                                               "model folder"),
    ("layers-vae", ["layers", "{F}/vae"], "pagkit does not know the model family of AutoencoderKL. Supported: "),
    ("sample-vae", ["sample", "--model", "{F}/vae", "--steps", "1", "--out", "{OUT}.png"],
     "does not know the model family of AutoencoderKL"),
    ("eval-classifier-missing", [*EVAL, "--classifier", "{F}/nope", "--out", "{OUT}"], "no classifier at {F}/nope"),
    ("eval-classifier-is-model", [*EVAL, "--classifier", "{F}/model16", "--out", "{OUT}"], "no classifier at"),
    ("eval-reference-missing", [*EVAL, "--reference", "{F}/nope", "--out", "{OUT}"], "no reference images at"),
    ("restore-classifier-missing", [*TEST_IMAGES, "--classifier", "{F}/nope", "--out", "{OUT}"], "no classifier at"),
    ("train-data-missing", [*TRAIN, "--data", "{F}/nope", "--out", "{OUT}"], "Fashion-MNIST files not found"),
    # numbers: NaN, inf, negative, zero steps
    ("sample-pag-nan", ["sample", *M16, "--pag-scale", "nan"], "argument --pag-scale: expected a number, got nan"),
    ("sample-pag-inf", ["sample", *M16, "--pag-scale", "inf"], "PAG scale must be a finite number, got inf"),
    ("sample-pag-minus-inf", ["sample", *M16, "--pag-scale=-inf"], "PAG scale must be a finite number, got -inf"),
    ("sample-cfg-inf", ["sample", "--cfg-scale", "inf"], "CFG scale must be a finite number"),
    ("sample-seg-sigma-negative", ["sample", *M16, "--seg-sigma", "-1"], "SEG sigma must be a positive number or inf"),
    ("sample-seg-sigma-nan", ["sample", *M16, "--seg-sigma", "nan"], "expected a number, got nan"),
    ("sample-steps-0", ["sample", *M16, "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    ("sample-steps-negative", ["sample", *M16, "--steps", "-3"], "expected a positive integer, got -3"),
    ("sample-steps-text", ["sample", *M16, "--steps", "ten"], "expected a positive integer, got 'ten'"),
    ("sample-num-images-0", ["sample", *M16, "--num-images", "0"], "expected a positive integer, got 0"),
    ("sample-threads-0", ["sample", *M16, "--threads", "0"], "argument --threads: expected a positive integer"),
    ("sample-guidance-scale-nan", ["sample", *M16, "--guidance", "pag:nan,layers=mid"],
     "PAG scale must be a finite number, got nan"),
    ("sample-guidance-interval", ["sample", *M16, "--guidance", "pag:1,start=0.8,stop=0.2"],
     "PAG interval must satisfy 0 <= start < stop <= 1"),
    ("eval-scales-nan", [*EVAL, "--scales", "1,nan", "--out", "{OUT}"], "argument --scales: expected a number"),
    ("eval-scales-inf", [*EVAL, "--scales", "inf", "--out", "{OUT}"], "PAG scale must be a finite number, got inf"),
    ("eval-sigma-negative", [*EVAL, "--methods", "seg", "--seg-sigmas", "-2", "--out", "{OUT}"],
     "SEG sigma must be a positive number or inf"),
    ("sample-pag-negative", ["sample", *M16, "--pag-scale=-1"], "PAG scale must be >= 0 (it is off at 0), got -1.0"),
    ("sample-cfg-negative", ["sample", "--cfg-scale=-2"], "CFG scale must be >= 0 (it is off at 1), got -2.0"),
    ("sample-guidance-negative", ["sample", *M16, "--guidance", "seg:-1,layers=mid"], "SEG scale must be >= 0"),
    ("sample-guidance-scale-end-negative", ["sample", *M16, "--guidance", "pag:1,layers=mid,scale_end=-1"],
     "PAG scale_end must be >= 0"),
    ("eval-scales-negative", [*EVAL, "--scales=-1", "--out", "{OUT}"], "PAG scale must be >= 0"),
    ("eval-steps-0", [*EVAL, "--steps", "0", "--out", "{OUT}"], "argument --steps: expected a positive integer"),
    ("eval-num-samples-0", [*EVAL, "--num-samples", "0", "--out", "{OUT}"], "expected a positive integer, got 0"),
    ("eval-intervals", [*EVAL, "--intervals", "0.5:0.1", "--out", "{OUT}"], "interval must satisfy 0 <= start < stop"),
    ("eval-intervals-text", [*EVAL, "--intervals", "early", "--out", "{OUT}"], "intervals look like 0:1,0:0.33"),
    ("restore-step-size-negative", [*RESTORE, "--input", "{F}/ok.png", "--step-size", "-1"],
     "argument --step-size: expected a finite number >= 0, got -1"),
    ("restore-step-size-nan", [*RESTORE, "--input", "{F}/ok.png", "--step-size", "nan"], "expected a number, got nan"),
    ("restore-eta-inf", [*RESTORE, "--input", "{F}/ok.png", "--eta", "inf"], "--eta: expected a finite number >= 0"),
    ("restore-noise-sigma-negative", [*RESTORE, "--input", "{F}/ok.png", "--noise-sigma", "-0.1"],
     "noise_sigma must be a finite number >= 0, got -0.1"),
    ("restore-blur-sigma-negative", [*RESTORE, "--task", "gaussian-deblur", "--input", "{F}/ok.png",
                                     "--blur-sigma", "-1"], "sigma must be"),
    ("restore-steps-0", [*RESTORE, "--input", "{F}/ok.png", "--steps", "0"], "expected a positive integer, got 0"),
    ("restore-first-image-negative", [*TEST_IMAGES, "--first-image", "-1", "--out", "{OUT}"],
     "argument --first-image: expected an integer >= 0, got -1"),
    ("restore-first-image-too-far", [*TEST_IMAGES, "--first-image", "9999", "--out", "{OUT}"],
     "num_images must be in 1..1 (from image 9999), got 2"),
    ("bench-steps-0", ["bench", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    ("bench-rounds-negative", ["bench", "--rounds", "-1"], "expected a positive integer, got -1"),
    ("train-lr-nan", [*TRAIN, "--lr", "nan", "--out", "{OUT}"], "argument --lr: expected a number, got nan"),
    ("train-lr-negative", [*TRAIN, "--lr", "-0.1", "--out", "{OUT}"], "lr must be a finite number in (0, inf)"),
    ("train-lr-inf", [*TRAIN, "--lr", "inf", "--out", "{OUT}"], "lr must be a finite number in (0, inf), got inf"),
    ("train-max-steps-0", [*TRAIN, "--max-steps", "0", "--out", "{OUT}"], "expected a positive integer, got 0"),
    ("train-budget-negative", [*TRAIN, "--time-budget-min", "-1", "--out", "{OUT}"], "expected a finite number >= 0"),
    ("train-stop-after-max", [*TRAIN, "--stop-at-step", "5", "--out", "{OUT}"],
     "stop_at_step must be an integer in [1, max_steps=1], got 5"),
    ("train-batch-larger-than-data", [*TRAIN, "--batch-size", "100000", "--out", "{OUT}"],
     "batch_size 100000 is larger than the training set (60000 images)"),
    # classes, schedulers, layers, sites, methods
    ("sample-class-label-out-of-range", ["sample", "--class-label", "57", "--steps", "1"],
     "--class-label 57 is out of range for fmnist-cond: its classes are 0..10; 10 is the null class"),
    ("sample-class-label-negative", ["sample", "--class-label", "-1", "--steps", "1"], "its classes are 0..10"),
    ("sample-class-label-unconditional", ["sample", *M16, "--class-label", "3", "--out", "{OUT}.png"],
     "is unconditional (its config has no num_class_embeds)"),
    ("sample-cfg-unconditional", ["sample", *M16, "--guidance", "cfg:3"], "CFG needs a class-conditional model"),
    ("sample-scheduler", ["sample", *M16, "--scheduler", "ddim2"],
     "argument --scheduler: invalid choice: 'ddim2' (choose from 'ddim', 'ddpm'"),
    ("sample-timestep-spacing", ["sample", *M16, "--timestep-spacing", "even"], "invalid choice: 'even'"),
    ("eval-scheduler", [*EVAL, "--scheduler", "lms", "--out", "{OUT}"], "invalid choice: 'lms'"),
    ("restore-scheduler", [*RESTORE, "--input", "{F}/ok.png", "--scheduler", "x"], "invalid choice: 'x'"),
    ("sample-layers", ["sample", *M16, "--pag-layers", "mid_blok"], "unknown layer 'mid_blok' in UNet2DModel; nearest "
                                                                    "valid names: "),
    ("sample-layers-out-of-range", ["sample", *M16, "--pag-layers", "down.7"], "unknown layer 'down.7'"),
    ("sample-seg-layers", ["sample", *M16, "--seg-layers", "up.9"], "unknown layer 'up.9'"),
    ("sample-sag-layer", ["sample", *M16, "--sag-layer", "nowhere"], "unknown layer 'nowhere'"),
    ("sample-guidance-kind", ["sample", *M16, "--guidance", "stg:1,layers=mid,kind=temporal"],
     "has no temporal attention sites; its sites are of kind: self"),
    ("sample-guidance-kind-unknown", ["sample", *M16, "--guidance", "stg:1,layers=mid,kind=diagonal"],
     "STG kind must be None or one of"),
    ("sample-guidance-method", ["sample", *M16, "--guidance", "pagg:1"],
     "unknown guidance method 'pagg'; choose one of cfg, pag, seg"),
    ("sample-guidance-option", ["sample", *M16, "--guidance", "pag:1,layer=mid"], "PAG has no option 'layer'; its "
                                                                                  "options: scale"),
    ("sample-guidance-rule", ["sample", *M16, "--guidance", "pag:1,rule=apq"], "unknown combination rule 'apq'; "
                                                                               "choose one of"),
    ("sample-guidance-perturbation", ["sample", *M16, "--guidance", "pag:1,perturbation=smear"],
     "unknown perturbation 'smear'; choose one of"),
    ("sample-guidance-twice", ["sample", *M16, "--guidance", "pag:1,scale=2"], "PAG: scale given twice"),
    ("sample-guidance-parenthesis", ["sample", *M16, "--guidance", "pag:1,rule=apg(eta=0"], "unbalanced '('"),
    ("eval-layers", [*EVAL, "--layers", "down.1;mid_blok", "--out", "{OUT}"], "unknown layer 'mid_blok'"),
    ("eval-methods", [*EVAL, "--methods", "none,pagg", "--out", "{OUT}"], "unknown method 'pagg'; choose one of none, "
                                                                          "cfg, pag"),
    ("eval-methods-cfg-twice", [*EVAL, "--methods", "cfg+cfg", "--out", "{OUT}"], "unknown method 'cfg+cfg'"),
    ("eval-perturbation", [*EVAL, "--perturbations", "smear", "--out", "{OUT}"], "unknown perturbation 'smear'"),
    ("eval-options", [*EVAL, "--options", "kernel=7", "--out", "{OUT}"], "option 'kernel' is a field of none of the "
                                                                         "methods pag"),
    ("eval-options-syntax", [*EVAL, "--options", "kernel", "--out", "{OUT}"], "options look like key=value"),
    ("eval-seed-sets", [*EVAL, "--seed-sets", "a", "--out", "{OUT}"], "argument --seed-sets"),
    ("restore-layers", [*RESTORE, "--input", "{F}/ok.png", "--pag-layers", "mid_blok"], "unknown layer 'mid_blok'"),
    ("restore-task", [*RESTORE, "--input", "{F}/ok.png", "--task", "deblur"],
     "argument --task: invalid choice: 'deblur' (choose from 'box-inpaint'"),
    ("restore-task-parameter", [*RESTORE, "--input", "{F}/ok.png", "--blur-sigma", "1"], "takes no parameter sigma"),
    ("bench-model", ["bench", "--model", "sdxl"], "argument --model: invalid choice: 'sdxl'"),
    ("train-size", [*TRAIN, "--size", "huge", "--out", "{OUT}"], "argument --size: invalid choice: 'huge'"),
    # images for restore --input
    ("restore-image-missing", [*RESTORE, "--input", "{F}/nope.png"], "no such input image: {F}/nope.png"),
    ("restore-image-not-an-image", [*RESTORE, "--input", "{F}/text.png"], "cannot read image {F}/text.png"),
    ("restore-image-truncated", [*RESTORE, "--input", "{F}/ok.png", "{F}/truncated.png"], "cannot read image"),
    ("restore-image-folder", [*RESTORE, "--input", "{F}"], "is a folder; give the image files"),
    ("restore-image-aspect", [*RESTORE, "--input", "{F}/tall.png"], "image {F}/tall.png is 20x64; this model takes "
                                                                    "16x16 images"),
    ("restore-image-too-small", [*RESTORE, "--input", "{F}/tiny.png"], "is 5x5; this model takes 16x16 images"),
    ("restore-image-channels", [*RESTORE, "--input", "{F}/ok.png", "--model", "{F}/vae"],
     "does not know the model family of AutoencoderKL"),
    # outputs: a file where a folder goes, a folder where a file goes, under a file, not writable
    ("sample-out-folder", ["sample", *M16, "--out", "{F}"], "--out {F} is a folder; give a file name"),
    ("sample-out-under-file", ["sample", *M16, "--out", "{F}/a-file/grid.png"],
     "the folder of --out {F}/a-file cannot be made: {F}/a-file is a file"),
    ("sample-out-not-writable", ["sample", *M16, "--out", "/proc/grid.png"], "/proc is not writable"),
    ("bench-out-folder", ["bench", "--model", "demo", "--out", "{F}"], "--out {F} is a folder"),
    ("eval-out-file", [*EVAL, "--out", "{F}/a-file"], "output folder {F}/a-file cannot be made: {F}/a-file is a file"),
    ("eval-out-not-writable", [*EVAL, "--out", "/proc/sweep"], "output folder /proc/sweep cannot be made"),
    ("restore-out-file", [*RESTORE, "--input", "{F}/ok.png", "--out", "{F}/a-file"], "{F}/a-file is a file"),
    ("restore-test-images-out-file", [*TEST_IMAGES, "--out", "{F}/a-file/x"], "{F}/a-file is a file"),
    ("train-out-file", [*TRAIN, "--out", "{F}/a-file"], "output folder {F}/a-file cannot be made"),
    # tune: every option checked before the first shard
    ("tune-method-unknown", [*TUNE, "--method", "pagg", "--out", "{OUT}"],
     "pagkit tune cannot choose sites for 'pagg'; choose one of pag, seg"),
    ("tune-method-cfg", [*TUNE, "--method", "cfg", "--out", "{OUT}"], "cannot choose sites for 'cfg'"),
    ("tune-scales-nan", [*TUNE, "--scales", "nan", "--out", "{OUT}"], "argument --scales: expected a number"),
    ("tune-scales-inf", [*TUNE, "--scales", "inf", "--out", "{OUT}"], "PAG scale must be a finite number, got inf"),
    ("tune-scales-negative", [*TUNE, "--scales=-1", "--out", "{OUT}"], "PAG scale must be >= 0"),
    ("tune-layers-unknown", [*TUNE, "--layers", "nope", "--out", "{OUT}"], "unknown layer 'nope'"),
    ("tune-intervals", [*TUNE, "--intervals", "0.5:0.1", "--out", "{OUT}"], "interval must satisfy 0 <= start < stop"),
    ("tune-budget-too-small", [*TUNE, "--budget", "10", "--out", "{OUT}"],
     "budget 10 samples is too small for 4 settings"),
    ("tune-eta-1", [*TUNE, "--eta", "1", "--out", "{OUT}"], "η (the halving rate) must be an integer >= 2, got 1"),
    ("tune-heads-seg", [*TUNE, "--method", "seg", "--heads", "--out", "{OUT}"], "seg has no heads option"),
    ("tune-greedy-heads-seg", [*TUNE, "--method", "seg", "--heads", "greedy", "--out", "{OUT}"],
     "seg has no heads option"),
    ("tune-heads-unknown", [*TUNE, "--heads", "best", "--out", "{OUT}"], "argument --heads: invalid choice: 'best'"),
    ("tune-max-heads-0", [*TUNE, "--heads", "greedy", "--max-heads", "0", "--out", "{OUT}"],
     "argument --max-heads: expected a positive integer, got 0"),
    ("tune-max-heads-without-greedy", [*TUNE, "--max-heads", "2", "--out", "{OUT}"],
     "--max-heads bounds the greedy head search: give it with --heads greedy"),
    # 4 settings + one round of the 2 heads x the last rung's 3 units, shards of 2: 2·(5 + 3·2 + 2·3 + 2·3) = 46
    ("tune-greedy-budget-too-small", [*TUNE, "--heads", "greedy", "--budget", "45", "--out", "{OUT}"],
     "and one round of the head search (2 candidates) (2 rungs, η = 3, shards of 2): the minimum is 46 samples"),
    ("tune-pair-best-1", [*TUNE, "--pair-best", "1", "--out", "{OUT}"], "--pair-best is how many of rung 0's best"),
    # 4 settings + at most 2 pairs at rung 1 (rungs of 4, 4, 2): 2·(5 + 5·2 + 2·1 + 3·6 + 2·9) = 106
    ("tune-pair-best-budget-too-small", [*TUNE, "--pair-best", "2", "--budget", "105", "--out", "{OUT}"],
     "too small for 4 settings + at most 2 pairs at rung 1 (3 rungs, η = 3, shards of 2): the minimum is 106"),
    ("tune-score-no-module", [*TUNE, "--score", "nomodule:f", "--out", "{OUT}"], "cannot import nomodule"),
    ("tune-score-no-function", [*TUNE, "--score", "os:nofunction", "--out", "{OUT}"], "os has no callable"),
    ("tune-model-pickled", [*TUNE, "--model", "{F}/pickled", "--out", "{OUT}"], "pagkit never unpickles"),
    ("tune-classifier-missing", [*TUNE, "--classifier", "{F}/nope", "--out", "{OUT}"], "no classifier at {F}/nope"),
    ("tune-out-file", [*TUNE, "--out", "{F}/a-file"], "{F}/a-file cannot be made: {F}/a-file is a file"),
    # studio: refused before the server starts
    ("studio-public-host-no-auth", ["studio", "--host", "0.0.0.0"], "--host 0.0.0.0 is not local: give --auth"),
    ("studio-auth-shape", ["studio", "--auth", "nopass"], "--auth looks like user:pass, got 'nopass'"),
    ("studio-port", ["studio", "--port", "70000"], "expected a port number 1..65535, got 70000"),
    ("studio-models-root-missing", ["studio", "--models-root", "{F}/nope"], "--models-root {F}/nope: not a folder"),
    ("studio-model-outside-root", ["studio", "--model", "{F}/model"], "model folders are off: start pagkit studio "
                                                                       "with --models-root DIR"),
    # conflicting options
    ("restore-input-and-test-images", [*RESTORE, "--input", "{F}/ok.png", "--test-images", "2"],
     "argument --test-images: not allowed with argument --input"),
    ("restore-no-source", [*RESTORE], "one of the arguments --input --test-images is required"),
    ("restore-degraded-test-images", [*TEST_IMAGES, "--degraded", "--out", "{OUT}"],
     "--degraded describes --input images"),
    ("eval-no-out", [a for a in EVAL if a != "--quiet"], "the following arguments are required: --out"),
    ("no-command", [], "the following arguments are required: command"),
    ("unknown-command", ["smaple"], "invalid choice: 'smaple' (choose from"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_bad_input_is_exit_2_a_short_message_and_no_output(files, tmp_path, argv, message, capsys):
    out = tmp_path / "out"
    argv = [a.replace("{F}", str(files)).replace("{OUT}", str(out)) for a in argv]
    before = sorted(p for p in files.rglob("*"))
    assert _run(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3 and "Traceback" not in err, err
    assert message.replace("{F}", str(files)) in err, err
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != io.LOCK_NAME]
    assert written == [], written  # no partial output (an output folder may have been made, empty)
    assert sorted(p for p in files.rglob("*")) == before  # nothing written beside the inputs either


@pytest.mark.parametrize("argv", [
    ["layers", "{F}/weights.pt"],
    ["restore", "--task", "sr2", "--model", "{F}/model16", "--input", "{F}/tall.png", "--out", "{OUT}"],
    ["train", "--size", "tiny", "--max-steps", "1", "--out", "{F}/a-file"],
], ids=["pickled-weights", "image-of-another-shape", "out-is-a-file"])
def test_bad_input_in_a_subprocess_prints_no_traceback(files, tmp_path, argv):
    argv = [a.replace("{F}", str(files)).replace("{OUT}", str(tmp_path / "out")) for a in argv]
    result = subprocess.run([sys.executable, "-m", "pagkit.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pagkit {argv[0]}: error: "), result.stderr
    assert not any(p.is_file() and p.name != io.LOCK_NAME for p in tmp_path.rglob("*"))


def _enospc(tmp, path):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("argv, product", [
    (["sample", *M16, "--steps", "1", "--num-images", "2", "--quiet", "--out", "{OUT}/grid.png"], "grid.png"),
    (["restore", "--task", "sr2", *M16, "--input", "{F}/ok.png", "--steps", "1", "--quiet", "--out", "{OUT}"],
     "grid.png"),
    ([*EVAL, "--out", "{OUT}"], "feature_space.json"),
    ([*TEST_IMAGES, "--out", "{OUT}"], "config.json"),
    ([*TRAIN, "--out", "{OUT}"], "snapshot.json"),
    (["bench", "--model", "demo", "--steps", "1", "--rounds", "1", "--demo-layers", "mid", "--out", "{OUT}/b.md"],
     "b.md"),
], ids=["sample", "restore", "eval", "restore-test-images", "train", "bench"])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_file(files, tmp_path, argv, product,
                                                                           monkeypatch, capsys):
    """The atomic writer (pagkit.io) failing as on a full disk: exit 2, the file and the reason, no .tmp left."""
    out = tmp_path / "out"
    argv = [a.replace("{F}", str(files)).replace("{OUT}", str(out)) for a in argv]
    monkeypatch.setattr(io, "_commit", _enospc)
    assert _run(argv) == 2
    err = capsys.readouterr().err
    parts = re.split(r"[\r\n]|(?=pagkit \w+: error: )", err)  # progress bars aside
    lines = [line for line in parts if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "cannot write " + str(out) in lines[0] and "No space left on device" in lines[0], err
    assert product in lines[0]
    left = [p for p in out.rglob("*") if p.is_file() and p.name != io.LOCK_NAME] if out.exists() else []
    assert left == [], left


# The Python API: the same checks, as ValueError/TypeError subclasses with the CLI's messages
def _api_cases(F):
    from pagkit.data import read_images
    from pagkit.evaluate import Sweep, expand
    from pagkit.layers import resolve_layers
    from pagkit.load import load_model, load_scheduler
    from pagkit.restore import dps, make_operator
    from pagkit.spec import parse_spec
    from pagkit.train import TrainConfig
    unet, scheduler = models.unet2d(), DDIMScheduler()
    conditional = models.unet2d(num_class_embeds=11)

    def sample(**kw):
        return lambda: pagkit.sample(**{"model": unet, "scheduler": scheduler, "num_inference_steps": 1,
                                        "progress_bar": False, **kw})
    return [
        ("missing-model", lambda: load_model(F / "nope"), "not found"),
        ("corrupt-weights", lambda: load_model(F / "random"), "is not a readable safetensors file"),
        ("truncated-weights", lambda: load_model(F / "truncated"), "corrupt or truncated"),
        ("pickled-folder", lambda: load_model(F / "pickled"), "pagkit never unpickles"),
        ("pickled-file", lambda: load_model(F / "weights.ckpt"), "is a pickled .ckpt file; pagkit never unpickles"),
        ("wrong-class", lambda: load_model(F / "classifier"), "names no model class"),
        ("no-model", lambda: load_model(F / "empty-folder"), "holds no diffusers model"),
        ("corrupt-tensors", lambda: io.load_tensors(F / "random" / "diffusion_pytorch_model.safetensors"),
         "is not a readable safetensors file"),
        ("vae", lambda: pagkit.GuidedDenoiser(load_model(F / "vae"), [pagkit.PAG(1.0)]),
         "does not know the model family of AutoencoderKL"),
        ("scale-nan", lambda: pagkit.PAG(float("nan")), "PAG scale must be a finite number, got nan"),
        ("scale-inf", lambda: pagkit.CFG(float("inf")), "CFG scale must be a finite number, got inf"),
        ("scale-text", lambda: pagkit.SEG("1"), "SEG scale must be a finite number, got '1'"),
        ("scale-negative", lambda: pagkit.SLG(-0.5), "SLG scale must be >= 0 (it is off at 0), got -0.5"),
        ("autoguidance-negative", lambda: pagkit.AutoGuidance(-1.0, weak_model=unet),
         "AutoGuidance scale must be >= 0 (it is off at 1), got -1.0"),
        ("sigma-negative", lambda: pagkit.SEG(1.0, sigma=-1.0), "SEG sigma must be a positive number or inf"),
        ("interval", lambda: pagkit.PAG(1.0, start=0.5, stop=0.5), "interval must satisfy 0 <= start < stop <= 1"),
        ("steps-0", sample(num_inference_steps=0), "num_inference_steps must be a positive integer, got 0"),
        ("batch-0", sample(batch_size=0), "batch_size must be a positive integer, got 0"),
        ("not-a-term", sample(guidance=["pag"]), "guidance terms must be pagkit guidance terms"),
        ("layer", sample(guidance=[pagkit.PAG(1.0, layers="mid_blok")]), "unknown layer 'mid_blok' in UNet2DModel"),
        ("layer-kind", sample(guidance=[pagkit.STG(1.0, layers="mid", kind="temporal")]), "has no temporal"),
        ("resolve", lambda: resolve_layers(unet, ["mid", ""]), "layer selections must be non-empty strings"),
        ("class-label-range", sample(model=conditional, class_labels=torch.tensor([57])),
         "class label 57 is out of range: UNet2DModel has classes 0..10"),
        ("null-class-range", sample(model=conditional, class_labels=torch.tensor([1]), null_class_label=11,
                                    guidance=[pagkit.CFG(2.0)]), "class label 11 is out of range"),
        ("class-label-unconditional", sample(class_labels=torch.tensor([3])), "UNet2DModel is unconditional"),
        ("latents-channels", sample(latents=torch.zeros(1, 3, 16, 16)), "latents of shape (1, 3, 16, 16)"),
        ("scheduler", lambda: load_scheduler(F / "model16", "ddim2"), "unknown scheduler 'ddim2'; choose one of ddim"),
        ("spacing", lambda: load_scheduler(F / "model16", "ddim", "even"), "unknown timestep spacing 'even'"),
        ("sag-needs-scheduler", lambda: pagkit.GuidedDenoiser(unet, [pagkit.SAG(1.0)]), "SAG needs the scheduler"),
        ("eval-method", lambda: expand(str(F / "model16"), ["pagg"]), "unknown method 'pagg'; choose one of none"),
        ("eval-option", lambda: expand(str(F / "model16"), ["pag"], options={"kernel": "7"}),
         "option 'kernel' is a field of none of the methods pag"),
        ("sweep-classifier", lambda: Sweep(F / "sweep", [], classifier=str(F / "nope")), "no classifier at"),
        ("train-lr", lambda: TrainConfig(out=str(F / "t"), lr=float("nan")), "lr must be a finite number in (0, inf)"),
        ("train-batch", lambda: TrainConfig(out=str(F / "t"), batch_size=0), "batch_size must be a positive integer"),
        ("train-size", lambda: TrainConfig(out=str(F / "t"), size="huge"), "size must be one of small, tiny"),
        ("task", lambda: make_operator("deblur"), "unknown task 'deblur'"),
        ("dps-step-size", lambda: dps(unet, scheduler, make_operator("sr2"), torch.zeros(1, 1, 8, 8), step_size=-1.0,
                                      num_inference_steps=1, progress_bar=False), "step_size must be a finite number"),
        ("dps-eta", lambda: dps(unet, scheduler, make_operator("sr2"), torch.zeros(1, 1, 8, 8), eta=float("inf"),
                                num_inference_steps=1, progress_bar=False), "eta must be a finite number >= 0"),
        ("image-aspect", lambda: read_images([F / "tall.png"], 1, (16, 16)), "is 20x64; this model takes 16x16"),
        ("image-unreadable", lambda: read_images([F / "text.png"], 1, (16, 16)), "cannot read image"),
        ("image-missing", lambda: read_images([F / "nope.png"], 1, (16, 16)), "no such input image"),
        ("image-channels", lambda: read_images([F / "ok.png"], 4, (16, 16)), "1- or 3-channel models, not 4"),
        ("out-folder", lambda: io.check_output_file(F), "is a folder; give a file name"),
        ("out-under-file", lambda: io.make_folder(F / "a-file" / "x"), "cannot be made: "),
        ("spec", lambda: parse_spec("pag:1,layers"), "PAG: 'layers' needs a key (key=value)"),
    ]



def test_api_bad_input_raises_value_or_type_errors_with_the_message(files):
    failures = []
    for name, call, message in _api_cases(files):
        try:
            call()
        except (ValueError, TypeError) as err:
            if message not in str(err):
                failures.append(f"{name}: message {str(err)!r} lacks {message!r}")
        except BaseException as err:  # noqa: BLE001  (the point: anything else is a failure)
            failures.append(f"{name}: {type(err).__name__}: {err}")
        else:
            failures.append(f"{name}: no error")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("argv, call", [
    (["layers", "{F}/random"], lambda F: pagkit.load.load_model(F / "random")),
    (["layers", "{F}/pickled"], lambda F: pagkit.load.load_model(F / "pickled")),
    (["sample", *M16, "--pag-layers", "mid_blok"], lambda F: pagkit.GuidedDenoiser(models.unet2d(), [
        pagkit.PAG(0.5, layers=["mid_blok"])])),
    (["restore", "--task", "sr2", *M16, "--input", "{F}/tall.png"],
     lambda F: pagkit.data.read_images([F / "tall.png"], 1, (16, 16))),
], ids=["corrupt", "pickled", "layer", "image"])
def test_the_cli_says_what_the_api_raises(files, argv, call, capsys):
    with pytest.raises((ValueError, TypeError)) as api:
        call(files)
    assert _run([a.replace("{F}", str(files)) for a in argv]) == 2
    assert capsys.readouterr().err.strip() == f"pagkit {argv[0]}: error: {str(api.value).splitlines()[0]}"
    assert isinstance(api.value, ValueError) and not isinstance(api.value, RuntimeError)
