"""pagkit studio (issue 21): the page's library functions, its refusals, and the page itself in headless Chromium.

The library tests call ``pagkit.studio.core`` directly. The browser test starts the app on a free port, drives it
with Playwright and Debian's chromium (``executable_path``; ``playwright install`` is never needed), and checks the
grid against the command line the page shows, run through the CLI. It skips, saying why, only if Gradio,
Playwright or the browser cannot start.
"""
import argparse
import dataclasses
import json
import os
import shlex
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pagkit import cli
from pagkit.load import shipped_models
from pagkit.studio import command, core

# Gradio 6.31's queue calls pandas 3 options it deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")
LABEL_WIDTH, PAD = 190, 2  # report.labelled_grid's label column and padding: tiles start right of them
CHROMIUM = os.environ.get("PAGKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FAST = dict(steps=3, num_images=3)


def _tiles(image) -> np.ndarray:
    """The sample tiles of a labelled grid (labels, which hold the studio's timings, cut off)."""
    return np.asarray(image.convert("RGB"))[:, LABEL_WIDTH + PAD:]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """``pagkit`` run in this process: (exit code, the error line without the CLI's prefix and --help hint)."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's refusals
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1].split(": error: ", 1)[-1] if err else ""
    return code, line.rsplit(" (see ", 1)[0] if line.endswith("--help)") else line


def _run_command(command_text: str, out: Path, capsys) -> Image.Image:
    argv = shlex.split(command_text)
    assert argv[0] == "pagkit"
    argv = argv[1:]
    argv[argv.index("--out") + 1] = str(out)
    code, err = _cli(argv, capsys)
    assert code == 0, err
    return Image.open(out)


# ------------------------------------------------------------------------------------------ the library

def test_the_command_line_is_the_requests_and_parses_with_the_clis_parser():
    request = core.Request(configs=["pag:1,layers=mid+down.2", "", "cfg:2; seg:1", "runs/p.json"], seed=3,
                           num_images=5.0, steps=7, scheduler="euler")
    text = core.command_line(request)
    assert text.startswith("pagkit sample --model fmnist --scheduler euler --steps 7 --seed 3 --num-images 5 ")
    args = core.parse_cli(shlex.split(text)[1:])
    assert (args.steps, args.seed, args.num_images, args.scheduler) == (7, 3, 5, "euler")
    assert args.guidance == ["pag:1,layers=mid+down.2", "cfg:2; seg:1"] and args.preset == ["runs/p.json"]


# (page request fields, the same input as pagkit sample arguments)
BAD = [
    (dict(configs=["pag:nan"]), ["--guidance", "pag:nan"]),
    (dict(configs=["pag:-1,layers=mid"]), ["--guidance", "pag:-1,layers=mid"]),
    (dict(configs=["seg:1,layers=nosuch"]), ["--guidance", "seg:1,layers=nosuch"]),
    (dict(configs=["pag:1,layerz=mid"]), ["--guidance", "pag:1,layerz=mid"]),
    (dict(configs=["cfg:2"]), ["--guidance", "cfg:2"]),
    (dict(steps=0), ["--steps", "0"]),
    (dict(steps=2.5), ["--steps", "2.5"]),
    (dict(num_images=-1), ["--num-images", "-1"]),
    (dict(scheduler="nosuch"), ["--scheduler", "nosuch"]),
]


@pytest.mark.parametrize("fields, argv", BAD, ids=[" ".join(a) for _, a in BAD])
def test_a_bad_input_is_refused_with_the_clis_message_before_any_sampling(fields, argv, capsys, tmp_path):
    with pytest.raises(core.StudioError) as refused:
        core.plan(core.Request(**{"steps": 2, "num_images": 2, **fields}))
    code, message = _cli(["sample", "--model", "fmnist", "--steps", "2", "--num-images", "2", *argv,
                          "--out", str(tmp_path / "x.png"), "--quiet"], capsys)
    assert code == 2 and str(refused.value) == message
    assert not (tmp_path / "x.png").exists()


def test_a_conditional_model_takes_a_class_and_cfg_and_refuses_a_class_out_of_range(capsys, tmp_path):
    assert core.classes("fmnist-cond") == list(range(10)) and core.classes("fmnist") == []
    plan = core.plan(core.Request(model="fmnist-cond", configs=["cfg:1.5; pag:0.5"], class_label=3, **FAST))
    assert [label for label, _ in plan.rows] == ["no guidance", "CFG 1.5\n+ PAG 0.5 (layers=mid)"]
    with pytest.raises(core.StudioError) as refused:
        core.plan(core.Request(model="fmnist-cond", class_label=11, **FAST))
    code, message = _cli(["sample", "--model", "fmnist-cond", "--class-label", "11", "--out",
                          str(tmp_path / "x.png")], capsys)
    assert code == 2 and str(refused.value) == message == ("--class-label 11 is out of range for fmnist-cond: its "
                                                           "classes are 0..10; 10 is the null class of CFG")
    result = core.compare(core.Request(model="fmnist-cond", configs=["pag:0.5"], steps=2, num_images=3))
    grid = _run_command(result.command, tmp_path / "cond.png", capsys)  # labels 0, 1, 2 along the columns
    assert np.array_equal(_tiles(grid), _tiles(result.grid))


def test_cfg_on_a_conditional_model_reproduces_through_the_cli(capsys, tmp_path):
    result = core.compare(core.Request(model="fmnist-cond", configs=["cfg:1.5"], class_label=3, steps=2,
                                       num_images=2))
    grid = _run_command(result.command, tmp_path / "cfg.png", capsys)
    assert np.array_equal(_tiles(grid), _tiles(result.grid))


def test_too_many_seeds_or_configurations_are_refused():
    with pytest.raises(core.StudioError, match=f"at most {core.MAX_SEEDS} seeds"):
        core.plan(core.Request(num_images=core.MAX_SEEDS + 1))
    with pytest.raises(core.StudioError, match=f"at most {core.MAX_CONFIGS} configurations"):
        core.plan(core.Request(configs=["pag:1"] * (core.MAX_CONFIGS + 1)))


@pytest.fixture(scope="module")
def compared():
    request = core.Request(configs=["pag:1,layers=mid", "seg:1"], **FAST)
    return core.compare(request)


def test_compare_draws_the_unguided_row_and_each_configuration_on_the_same_seeds(compared):
    assert [r.label for r in compared.rows] == ["no guidance", "PAG 1 (layers=mid)", "SEG 1 (layers=mid)"]
    assert [r.spec for r in compared.rows] == ["none", "pag:1", "seg:1"]
    assert all(r.images.shape == (3, 1, 32, 32) and r.seconds > 0 for r in compared.rows)
    assert compared.grid.size[1] == 3 * (32 * 3 + PAD) + PAD  # three rows of 3x-zoomed tiles
    assert [row[3] for row in compared.table()] == [round(r.seconds_per_image, 4) for r in compared.rows]


def test_the_shown_command_line_reproduces_the_grids_pixels(compared, capsys, tmp_path):
    grid = _run_command(compared.command, tmp_path / "cli.png", capsys)
    assert np.array_equal(_tiles(grid), _tiles(compared.grid))


def test_cancel_stops_within_a_step():
    cancel, seen = threading.Event(), []

    def progress(row, step, steps):
        seen.append((row, step))
        if (row, step) == (1, 2):
            cancel.set()
    with pytest.raises(core.Cancelled, match="step 2 of 5 of row 2"):
        core.compare(core.Request(configs=["pag:1"], steps=5, num_images=2), progress=progress, cancel=cancel)
    assert seen[-1] == (1, 2) and len(seen) == 5 + 2


def test_the_scale_strip_varies_the_last_terms_scale():
    assert core.parse_scales("0.5:8:5") == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert core.parse_scales("0,1, 3") == [0.0, 1.0, 3.0]
    assert core.strip_specs("cfg:1.5; pag:1,layers=down.2", [0.5, 2]) == [
        "cfg:1.5; pag:0.5,layers=down.2", "cfg:1.5; pag:2,layers=down.2"]
    with pytest.raises(core.StudioError, match="scales look like"):
        core.parse_scales("1:2")
    with pytest.raises(core.StudioError, match="PAG scale must be >= 0"):
        core.scale_strip(core.Request(**FAST), "pag:1", [1, -2])
    result = core.scale_strip(core.Request(steps=2, num_images=2), "pag:1,layers=mid", "1,4")
    assert [r.label for r in result.rows] == ["no guidance", "PAG 1 (layers=mid)", "PAG 4 (layers=mid)"]
    assert all(0 <= r.white_fraction <= 1 and -1 <= r.mean_pixel <= 1 for r in result.rows)


def test_the_sites_explorer_draws_one_column_per_site():
    from pagkit.layers import layers
    sites = [info.name for info in layers(core._model("fmnist"))]
    result, cols = core.site_columns(core.Request(steps=1, num_images=2), "pag:1")
    assert [c[0] for c in cols] == [None] + sites
    assert all(f"layers={site}" in spec for site, spec, _ in cols[1:])
    assert cols[1][2].size == (32 * 3 + 4, 2 * (32 * 3 + PAD) + PAD)  # the row's two seeds, top to bottom
    with pytest.raises(core.StudioError, match="no layers option"):
        core.site_specs(core._model("fmnist"), "cfg:2")


# ---------------------------------------------------------------------------------------------- paths

@pytest.fixture()
def roots(tmp_path):
    """A --models-root with a good model, a link out, a pickled one; a folder outside it."""
    root, outside = tmp_path / "models", tmp_path / "outside"
    root.mkdir()
    shutil.copytree(shipped_models()["fmnist"], root / "good")
    shutil.copytree(shipped_models()["fmnist"], outside / "model")
    (root / "escape").symlink_to(outside / "model")
    shutil.copytree(shipped_models()["fmnist"], root / "linked-weights", symlinks=True)
    weights = next((root / "linked-weights").rglob("*.safetensors"))
    weights.unlink()
    weights.symlink_to(next((outside / "model").rglob("*.safetensors")))
    shutil.copytree(shipped_models()["fmnist"], root / "pickled")
    (root / "pickled" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    return root, outside


def test_model_folders_open_only_under_the_models_root(roots):
    root, outside = roots
    assert core.check_model("fmnist") == "fmnist"
    assert core.check_model("good", root) == str((root / "good").resolve())
    # links are not followed while listing (escape is not offered); a refused folder says why when picked
    assert core.list_models(root) == core.studio_models() + ["good", "linked-weights", "pickled"]
    cases = {
        "good": (None, "model folders are off: start pagkit studio with --models-root"),
        str(outside / "model"): (root, "is outside"),
        "../outside/model": (root, "is outside"),
        "escape": (root, "is outside"),  # a symlink out of the root
        "linked-weights": (root, "links outside"),
        "pickled": (root, "pickled weights file"),
        "good/unet/diffusion_pytorch_model.bin": (root, "not found"),
        "nosuch": (root, "not found"),
    }
    for name, (where, message) in cases.items():
        with pytest.raises(core.StudioError, match=message):
            core.check_model(name, where)
    with pytest.raises(core.StudioError, match="is outside"):  # and so the page never loads it
        core.plan(core.Request(model="escape", **FAST), models_root=root)


def test_a_folder_under_the_root_samples_like_the_shipped_model(roots):
    root, _ = roots
    a = core.compare(core.Request(model="good", steps=2, num_images=2), models_root=root)
    b = core.compare(core.Request(model="fmnist", steps=2, num_images=2))
    assert np.array_equal(_tiles(a.grid), _tiles(b.grid))
    assert f"--model {(root / 'good').resolve()}" in a.command


def test_the_results_browser_reads_an_out_folder_and_nothing_outside(tmp_path):
    _fake_out(tmp_path / "files" / "runs" / "sweep")
    tune = tmp_path / "files" / "runs" / "tune"
    tune.mkdir()
    (tune / "tune.md").write_text("# tune\n")
    files = tmp_path / "files"
    assert core.list_results(files) == ["runs/sweep", "runs/tune"]
    found = core.read_results("runs/sweep", files)
    assert "| none | 44.0 |" in found.markdown and [c for _, c in found.images] == ["grid.png", "plots/fd_vs_scale.png"]
    assert core.read_results("runs/tune", files).markdown.startswith("### tune.md")
    (files / "empty").mkdir()
    for name, message in (("empty", "holds no results.md"), ("../", "is outside"), ("/etc", "is outside")):
        with pytest.raises(core.StudioError, match=message):
            core.read_results(name, files)
    with pytest.raises(core.StudioError, match="opens no results folders"):
        core.read_results("runs/sweep", None)


def test_presets_open_only_under_the_files_root(tmp_path):
    from pagkit import io
    io.write_json(tmp_path / "preset.json", {"pagkit_preset": 1, "method": "pag", "spec": "pag:0.5,layers=mid",
                                             "model": "fmnist", "family": "unet"})
    plan = core.plan(core.Request(configs=["preset.json"], **FAST), files_root=tmp_path)
    assert [label for label, _ in plan.rows] == ["no guidance", "PAG 0.5 (layers=mid)"]
    assert f"--preset {tmp_path / 'preset.json'}" in plan.command
    (tmp_path / "sub").mkdir()
    with pytest.raises(core.StudioError, match="is outside"):
        core.plan(core.Request(configs=["../preset.json"], **FAST), files_root=tmp_path / "sub")
    with pytest.raises(core.StudioError, match="opens no preset files"):
        core.plan(core.Request(configs=["preset.json"], **FAST), files_root=None)


def test_a_non_local_host_needs_auth(capsys):
    assert command.check_access("127.0.0.1", None) is None and command.check_access("::1", None) is None
    assert command.check_access("localhost", "me:pw") == ("me", "pw")
    with pytest.raises(ValueError, match="--host 0.0.0.0 is not local: give --auth user:pass"):
        command.check_access("0.0.0.0", None)
    assert "reachable from other machines" in capsys.readouterr().err
    assert command.check_access("192.168.1.5", "me:pw") == ("me", "pw")
    assert "warning" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--auth looks like user:pass"):
        command.check_access("127.0.0.1", "nopassword")
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["studio"])
    assert (args.host, args.port, args.models_root, args.auth, args.func) == ("127.0.0.1", 7860, None, None,
                                                                             command.run)
    with pytest.raises(ValueError, match="not local"):  # refused before Gradio is even imported
        command.run(parser.parse_args(["studio", "--host", "0.0.0.0"]))


# ------------------------------------------------------------------------------------ pipeline folders

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet CLIP's BPE vocabulary is written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_sd_pipeline(path: Path) -> Path:
    """A StableDiffusionPipeline of random weights saved with save_pretrained (safetensors), with a tiny CLIP
    text encoder and a byte-level CLIP tokenizer (no merges: one token per character) built here, offline."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import models
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    words = path.parent / f"{path.name}-tokenizer-files"
    words.mkdir(parents=True)
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1)).eval()
    pipe = StableDiffusionPipeline(unet=models.sd_unet(), vae=models.vae(), scheduler=models.ddim(),
                                   text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines") / "models"
    tiny_sd_pipeline(root / "tiny-sd")
    return root


def test_a_pipeline_folder_takes_a_prompt_and_draws_guided_rows_through_attach(pipeline_root):
    import pagkit
    from pagkit.report import to_uint8
    root = pipeline_root
    assert "tiny-sd" in core.list_models(root)
    assert core.condition("tiny-sd", root) == ("prompt", []) and core.condition("fmnist-cond")[0] == "class"
    request = core.Request(model="tiny-sd", prompt="a red square", configs=["pag:2,layers=mid", "cfg:3; seg:1"],
                           steps=2, num_images=2)
    result = core.compare(request, models_root=root)
    assert [r.label for r in result.rows] == ["no guidance", "PAG 2 (layers=mid)", "CFG 3\n+ SEG 1 (layers=mid)"]
    images = [to_uint8(r.images) for r in result.rows]
    assert images[0].shape == (2, 32, 32, 3)
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])
    again = core.compare(request, models_root=root)  # the same seeds: the same pixels
    assert all(np.array_equal(a, to_uint8(r.images)) for a, r in zip(images, again.rows))
    # the PAG row is the pipeline under pagkit.attach, drawn here by hand
    pipe = core._MODELS[f"pipeline:{(root / 'tiny-sd').resolve()}"]
    with pagkit.attach(pipe, pagkit.PAG(2.0, layers="mid")):
        by_hand = pipe("a red square", num_inference_steps=2, num_images_per_prompt=2, guidance_scale=1.0,
                       generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(np.stack([np.asarray(im) for im in by_hand]), images[1])
    # pagkit sample has no prompt: what the page shows is the Python that draws the same rows
    assert not result.command.startswith("pagkit sample") and "pagkit.attach(pipe, parse_spec('seg:1'))" in \
        result.command and "guidance_scale=3.0" in result.command
    scope = {}
    exec(result.command, scope)  # noqa: S102 - the studio's own output, run as a user would
    shown = [np.stack([np.asarray(im) for im in row]) for row in scope["rows"].values()]
    assert list(scope["rows"]) == [r.label.replace("\n", " ") for r in result.rows]
    assert all(np.array_equal(a, b) for a, b in zip(shown, images))


def test_a_pipeline_refuses_an_empty_prompt_a_class_and_what_attach_refuses_before_drawing(pipeline_root):
    root, drawn = pipeline_root, []
    for fields, message in (
            (dict(prompt="  "), "tiny-sd is a text-to-image pipeline: give a prompt"),
            (dict(prompt="x", class_label=3), "--class-label 3: tiny-sd is a text-to-image pipeline"),
            (dict(prompt="x", configs=["pag:1,layers=nosuch"]), "unknown layer 'nosuch' in UNet2DConditionModel"),
            (dict(prompt="x", configs=["cfg:2,rule=apg"]), "the pipeline applies CFG itself, so a rule on CFG"),
            (dict(prompt="x", steps=0), "argument --steps: expected a positive integer")):
        with pytest.raises(core.StudioError) as refused:
            core.compare(core.Request(model="tiny-sd", **{"steps": 2, "num_images": 2, **fields}), models_root=root,
                         progress=lambda *a: drawn.append(a))
        assert str(refused.value).startswith(message), str(refused.value)
    assert drawn == []  # refused before any step


def test_cancel_stops_a_pipeline_within_a_step_and_leaves_it_unguided(pipeline_root):
    from pagkit.report import to_uint8
    request = core.Request(model="tiny-sd", prompt="a red square", configs=["pag:2,layers=mid"], steps=2,
                           num_images=1)
    plain = core.compare(dataclasses.replace(request, configs=[]), models_root=pipeline_root).rows[0]
    cancel = threading.Event()

    def progress(row, step, steps):
        if (row, step) == (1, 1):
            cancel.set()
    with pytest.raises(core.Cancelled, match="step 1 of 2 of row 2"):
        core.compare(request, models_root=pipeline_root, progress=progress, cancel=cancel)
    pipe = core._MODELS[f"pipeline:{(pipeline_root / 'tiny-sd').resolve()}"]
    assert "forward" not in vars(pipe.unet)  # pagkit.attach put the UNet's own forward back
    after = core.compare(dataclasses.replace(request, configs=[]), models_root=pipeline_root).rows[0]
    assert np.array_equal(to_uint8(after.images), to_uint8(plain.images))


def test_a_pipeline_folder_with_a_pickled_weights_file_or_foreign_code_is_refused(pipeline_root, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(pipeline_root / "tiny-sd", root / "sd-with-bin")
    (root / "sd-with-bin" / "text_encoder" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(core.StudioError, match="is a pickled weights file"):
        core.condition("sd-with-bin", root)
    index = json.loads((root / "sd-with-bin" / "model_index.json").read_text())
    (root / "sd-with-bin" / "text_encoder" / "pytorch_model.bin").unlink()
    index["unet"] = ["my_module", "MyUNet"]
    (root / "sd-with-bin" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(core.StudioError, match="component 'unet' comes from 'my_module'"):
        core.plan(core.Request(model="sd-with-bin", prompt="x", **FAST), models_root=root)


# ---------------------------------------------------------------------------------------------- the page

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_out(out: Path) -> None:
    """A small OUT folder as pagkit eval leaves it: results.md, a plot, a grid."""
    (out / "plots").mkdir(parents=True)
    (out / "results.md").write_text("| config | fd |\n|---|---|\n| none | 44.0 |\n| pag:0.5 | 42.3 |\n")
    Image.new("RGB", (64, 48), "red").save(out / "plots" / "fd_vs_scale.png")
    Image.new("RGB", (64, 48), "blue").save(out / "grid.png")


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    """The studio on a free port and a headless Chromium page on it; skips, saying why, if either cannot start."""
    pytest.importorskip("gradio", reason="pagkit studio needs Gradio: pip install 'pagkit[studio]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Playwright (pip)")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium, or set PAGKIT_CHROMIUM)")
    files = tmp_path_factory.mktemp("studio-files")
    _fake_out(files / "runs" / "sweep")
    models_root = tmp_path_factory.mktemp("studio-models") / "models"
    tiny_sd_pipeline(models_root / "tiny-sd")
    args = argparse.Namespace(model="fmnist", models_root=str(models_root), files_root=str(files), host="127.0.0.1",
                              port=_free_port(), auth=None, threads=None)
    app, url = command.launch(args, block=False)
    playwright = sync_api.sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
    except Exception as err:  # noqa: BLE001 - any launch failure means: no browser here
        playwright.stop()
        app.close()
        pytest.skip(f"headless chromium ({CHROMIUM}) cannot start: {str(err).splitlines()[0]}")
    page = browser.new_page(viewport={"width": 1280, "height": 1300})
    page.set_default_timeout(120_000)
    page.requested = []  # every URL the page asks for: offline means all of them are the studio's own
    page.on("request", lambda r: page.requested.append(r.url))
    page.goto(url)
    page.wait_for_selector("#config-0 textarea")
    page.studio_url = url
    yield page
    browser.close()
    playwright.stop()
    app.close()


def _set(page, selector: str, value: str) -> None:
    page.fill(selector, value)
    page.locator(selector).dispatch_event("blur")  # Gradio reads a number field when it loses focus


def _fill_compare(page, steps: int, seeds: int, configs: list[str]) -> None:
    """The Compare tab's form: steps, seeds, and the configurations (the rest of the six emptied)."""
    _set(page, "#steps input", str(steps))
    _set(page, "#seeds input", str(seeds))
    for i in range(6):
        page.fill(f"#config-{i} textarea", configs[i] if i < len(configs) else "")


def test_the_page_generates_two_configurations_as_the_shown_command_line_does(browser_page, capsys, tmp_path):
    page = browser_page
    _fill_compare(page, steps=3, seeds=3, configs=["pag:1,layers=mid", "seg:1"])
    page.click("#generate")
    page.wait_for_selector("#compare-grid img")
    page.wait_for_function("document.querySelector('#compare-command textarea').value.startsWith('pagkit')")
    assert page.locator("#compare-table div[role=row][data-index]").count() == 3  # Gradio's grid of rows
    labels = [page.inner_text(f"#compare-table [data-testid=cell-{i}-1]").strip() for i in range(3)]
    assert labels == ["no guidance", "PAG 1 (layers=mid)", "SEG 1 (layers=mid)"]
    assert page.locator("#compare-progress progress").count() == 3  # one bar per configuration
    shown = page.locator("#compare-command textarea").input_value()
    assert "--guidance pag:1,layers=mid --guidance seg:1" in shown and "--steps 3" in shown
    source = page.locator("#compare-grid img").get_attribute("src")
    (tmp_path / "page.png").write_bytes(page.request.get(source).body())
    on_page = Image.open(tmp_path / "page.png")
    assert on_page.size[1] == 3 * (32 * 3 + PAD) + PAD  # three labelled rows of three seeds
    assert np.array_equal(_tiles(on_page), _tiles(_run_command(shown, tmp_path / "cli.png", capsys)))


def test_the_readme_screenshot_is_the_compare_tab_after_one_generate(browser_page, tmp_path):
    """docs/studio.png: ``PAGKIT_SCREENSHOT=docs/studio.png pytest tests/test_studio.py -k readme_screenshot``
    draws the page's defaults (fmnist, DDIM-20, 8 seeds, 4 rows; about 40 s on 2 cores) and writes the
    screenshot there. Without the variable the same steps run at 2 steps and 2 seeds, into a temporary file."""
    target = os.environ.get("PAGKIT_SCREENSHOT")
    page = browser_page.context.browser.new_page(viewport={"width": 1280, "height": 1300})  # every field at its default
    page.set_default_timeout(300_000)
    page.goto(browser_page.studio_url)
    page.wait_for_selector("#config-0 textarea")
    if not target:
        _set(page, "#steps input", "2")
        _set(page, "#seeds input", "2")
    page.click("#generate")
    page.wait_for_selector("#compare-grid img")
    page.wait_for_function("document.querySelector('#compare-command textarea').value.startsWith('pagkit')")
    page.wait_for_function("[...document.images].every(img => img.complete)")
    path = Path(target or tmp_path / "studio.png")
    page.screenshot(path=str(path), full_page=True)
    seeds = core.DEFAULT_SEEDS if target else 2
    shot = Image.open(path)
    assert shot.width == 1280 and shot.height >= 1300  # the viewport's width, the whole page's height
    rows = 1 + len([c for c in core.DEFAULT_CONFIGS if c])  # the unguided row and pagkit sample's PAG, SEG, SAG
    assert page.locator("#compare-table div[role=row][data-index]").count() == rows
    assert f"--num-images {seeds} " in page.locator("#compare-command textarea").input_value()
    page.close()


def test_a_bad_input_typed_into_the_page_shows_the_error_and_draws_nothing(browser_page):
    page = browser_page
    page.fill("#config-0 textarea", "pag:1,layers=nosuch")
    page.click("#generate")
    page.wait_for_selector("#compare-error .studio-error")
    assert page.inner_text("#compare-error").startswith("unknown layer 'nosuch' in UNet2DModel; nearest valid names")
    assert page.locator("#compare-grid img").count() == 0
    assert page.locator("#compare-command textarea").input_value() == ""


def test_clicking_a_site_column_puts_the_site_into_a_configuration(browser_page):
    page = browser_page
    _set(page, "#steps input", "1")
    _set(page, "#seeds input", "2")
    page.get_by_role("tab", name="Sites").click()
    page.fill("#sites-spec textarea", "pag:2")
    page.click("#sites-generate")
    image = page.locator("#sites-grid img")
    image.wait_for()
    natural = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    columns = 1 + 7  # the unguided column and fmnist's seven sites
    width = natural[0] // columns
    box = image.bounding_box()
    x = (3 * width + width / 2) / natural[0] * box["width"]  # the fourth column: mid_block.attentions.0
    image.click(position={"x": x, "y": box["height"] * 0.6})
    page.wait_for_function("document.querySelector('#config-0 textarea').value.includes('mid_block')")
    assert page.locator("#config-0 textarea").input_value() == "pag:2,layers=mid_block.attentions.0"
    assert "--guidance pag:2,layers=mid_block.attentions.0" in page.locator("#sites-command textarea").input_value()


def test_the_results_tab_shows_an_out_folders_table_and_images(browser_page):
    page = browser_page
    page.get_by_role("tab", name="Results").click()
    page.fill("#results-folder input", "runs/sweep")
    page.locator("#results-folder input").press("Enter")
    page.click("#results-open")
    page.wait_for_selector("#results-text table")
    assert "42.3" in page.inner_text("#results-text")
    page.wait_for_selector("#results-gallery img")
    assert page.locator("#results-gallery img").count() == 2
    page.fill("#results-folder input", "/etc")
    page.locator("#results-folder input").press("Enter")
    page.click("#results-open")
    page.wait_for_selector("#results-error .studio-error")
    assert "is outside" in page.inner_text("#results-error")


def test_cancel_on_the_page_stops_the_run_and_draws_nothing(browser_page):
    page = browser_page
    page.get_by_role("tab", name="Compare").click()
    _set(page, "#steps input", "500")
    _set(page, "#seeds input", "2")
    page.fill("#config-0 textarea", "pag:1")
    page.click("#generate")
    page.wait_for_selector("#compare-progress progress")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#compare-error').innerText.includes('cancelled')")
    assert page.inner_text("#compare-error").startswith("cancelled at step")
    assert page.locator("#compare-grid img").count() == 0


def test_the_server_serves_no_file_of_this_machine(browser_page):
    for path in (Path("pyproject.toml").resolve(), Path("/etc/passwd")):
        for route in ("gradio_api/file=", "file="):
            response = browser_page.request.get(browser_page.studio_url + route + str(path))
            assert response.status in (403, 404), (route, path, response.status)


def test_the_page_is_offline_and_sends_no_telemetry(browser_page):
    from urllib.parse import urlparse
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    local = urlparse(browser_page.studio_url).netloc
    foreign = [u for u in browser_page.requested if urlparse(u).scheme in ("http", "https", "ws", "wss")
               and urlparse(u).netloc != local]
    assert browser_page.requested and not foreign


def _grid_png(page, selector: str, path: Path) -> Image.Image:
    """The grid the page shows, as the PNG file the server sent."""
    (path).write_bytes(page.request.get(page.locator(selector).get_attribute("src")).body())
    return Image.open(path)


def test_the_scale_strip_tab_draws_one_labelled_row_per_scale_as_its_command_line_does(browser_page, capsys,
                                                                                       tmp_path):
    page = browser_page
    _set(page, "#steps input", "2")
    _set(page, "#seeds input", "2")
    page.get_by_role("tab", name="Scale strip").click()
    page.fill("#strip-spec textarea", "seg:1,layers=mid")
    page.fill("#strip-scales textarea", "0.5:2:3")
    page.click("#strip-generate")
    page.wait_for_selector("#strip-grid img")
    page.wait_for_function("document.querySelector('#strip-command textarea').value.startsWith('pagkit')")
    rows = 1 + 3  # the unguided row, then one per scale
    assert page.locator("#strip-table div[role=row][data-index]").count() == rows
    labels = [page.inner_text(f"#strip-table [data-testid=cell-{i}-1]").strip() for i in range(rows)]
    assert labels == ["no guidance", "SEG 0.5 (layers=mid)", "SEG 1 (layers=mid)", "SEG 2 (layers=mid)"]
    assert page.locator("#strip-progress progress").count() == rows
    shown = page.locator("#strip-command textarea").input_value()
    assert "--guidance seg:0.5 --guidance seg:1 --guidance seg:2 " in shown  # mid is SEG's default site
    on_page = _grid_png(page, "#strip-grid img", tmp_path / "page.png")
    assert on_page.size[1] == rows * (32 * 3 + PAD) + PAD
    assert np.array_equal(_tiles(on_page), _tiles(_run_command(shown, tmp_path / "cli.png", capsys)))


def _pick(page, selector: str, option: str) -> None:
    """Choose ``option`` in a Gradio dropdown as a user does: open it, click the option."""
    page.click(f"{selector} input")
    page.get_by_role("option", name=option, exact=True).click()


def test_switching_the_model_shows_its_class_control_and_generates_with_it(browser_page, capsys, tmp_path):
    page = browser_page
    page.get_by_role("tab", name="Compare").click()
    _fill_compare(page, steps=2, seeds=2, configs=["cfg:1.5; pag:0.5"])
    assert not page.locator("#class").is_visible()  # fmnist is unconditional
    _pick(page, "#model", "fmnist-cond")
    page.locator("#class").wait_for(state="visible")
    _pick(page, "#class", "3")
    page.click("#generate")
    page.wait_for_selector("#compare-grid img")
    page.wait_for_function("document.querySelector('#compare-command textarea').value.startsWith('pagkit')")
    shown = page.locator("#compare-command textarea").input_value()
    assert "--model fmnist-cond" in shown and "--class-label 3" in shown
    on_page = _grid_png(page, "#compare-grid img", tmp_path / "page.png")
    assert np.array_equal(_tiles(on_page), _tiles(_run_command(shown, tmp_path / "cli.png", capsys)))
    _pick(page, "#model", "fmnist")  # back: no class, and CFG is refused with the CLI's message
    page.locator("#class").wait_for(state="hidden")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#compare-error').innerText.includes('CFG needs')")
    assert "CFG needs a class-conditional model" in page.inner_text("#compare-error")
    assert page.locator("#compare-grid img").count() == 0


def test_a_pipeline_folder_on_the_page_asks_for_a_prompt_and_shows_the_python_that_draws_it(browser_page,
                                                                                         tmp_path):
    page = browser_page
    page.get_by_role("tab", name="Compare").click()
    _fill_compare(page, steps=2, seeds=2, configs=["pag:2,layers=mid"])
    _pick(page, "#model", "tiny-sd")
    page.locator("#prompt").wait_for(state="visible")
    assert page.locator("#negative").is_visible() and not page.locator("#class").is_visible()
    page.fill("#prompt textarea", "")
    page.click("#generate")  # no prompt: the error, and nothing drawn (the last test's error goes first)
    page.wait_for_function("document.querySelector('#compare-error').innerText.includes('give a prompt')")
    assert "tiny-sd is a text-to-image pipeline: give a prompt" in page.inner_text("#compare-error")
    assert page.locator("#compare-grid img").count() == 0
    page.fill("#prompt textarea", "a red square")
    page.click("#generate")
    page.wait_for_selector("#compare-grid img")
    page.wait_for_function("document.querySelector('#compare-command textarea').value.includes('pagkit.attach')")
    labels = [page.inner_text(f"#compare-table [data-testid=cell-{i}-1]").strip() for i in range(2)]
    assert labels == ["no guidance", "PAG 2 (layers=mid)"]
    scope = {}
    exec(page.locator("#compare-command textarea").input_value(), scope)  # noqa: S102 - as a user runs it
    on_page = _grid_png(page, "#compare-grid img", tmp_path / "page.png")
    assert on_page.size[1] == 2 * (32 * 3 + PAD) + PAD
    for r, images in enumerate(scope["rows"].values()):  # each row's tiles: 3x zoomed, PAD apart
        for c, image in enumerate(images):
            top, left = PAD + r * (32 * 3 + PAD), c * (32 * 3 + PAD)
            tile = _tiles(on_page)[top:top + 96:3, left:left + 96:3]
            assert np.array_equal(tile, np.asarray(image.convert("RGB"))), (r, c)
    _pick(page, "#model", "fmnist")  # back: the prompt goes
    page.locator("#prompt").wait_for(state="hidden")


def test_the_scale_strip_and_the_sites_explorer_draw_a_pipeline_folder_through_attach(pipeline_root):
    from pagkit.report import to_uint8
    request = core.Request(model="tiny-sd", prompt="a red square", steps=2, num_images=2)
    strip = core.scale_strip(request, "pag:1,layers=mid", "0,2", models_root=pipeline_root)
    assert [r.label for r in strip.rows] == ["no guidance", "PAG 0 (layers=mid)", "PAG 2 (layers=mid)"]
    unguided, zero, two = (to_uint8(r.images) for r in strip.rows)
    assert np.array_equal(unguided, zero) and not np.array_equal(unguided, two)  # s = 0 is the unguided row
    result, cols = core.site_columns(request, "pag:2", models_root=pipeline_root)
    import pagkit
    from pagkit.studio.pipeline import load_pipeline
    sites = [info.name for info in pagkit.layers(load_pipeline(str(pipeline_root / "tiny-sd")).unet)]
    assert [site for site, _, _ in cols] == [None, *sites] and len(result.rows) == len(sites) + 1
    # a pipeline's grid comes with its Python, not a CLI line
    assert "pagkit.attach" in result.command and result.command.startswith("import diffusers")


def test_a_shipped_preset_is_taken_by_name_without_a_files_root():
    import pagkit
    from pagkit.spec import label
    plan = core.plan(core.Request(configs=["fmnist:pag"], **FAST), files_root=None)
    assert [text for text, _ in plan.rows] == ["no guidance", label(pagkit.load_preset("fmnist:pag"))]
    assert "--preset fmnist:pag" in plan.command
