"""Bad input a new user meets first: one clear line and exit code 2 from the CLI, before any work."""
import logging
import shutil
import time

import pytest

from pagkit.cli import main
from pagkit.load import load_model, shipped_models


@pytest.fixture
def unet_copy(tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(shipped_models()["fmnist"] / "unet", folder)
    return folder


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_corrupt_weights_are_one_line_not_a_traceback(unet_copy, damage, capsys):
    weights = unet_copy / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(bytes(range(256)) * 4 if damage == "random" else data[:len(data) // 2])
    assert main(["sample", "--model", str(unet_copy), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a readable safetensors file" in err[0] and str(weights) in err[0]
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_model(unet_copy)


def test_class_label_out_of_range_names_the_valid_classes(capsys):
    assert main(["sample", "--class-label", "57", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--class-label 57 is out of range" in err and "0..10" in err and "null class" in err


def test_invalid_scales_fail_before_any_model_is_loaded(monkeypatch, capsys):
    import pagkit.cli as cli

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")
    monkeypatch.setattr(cli, "load_model", no_loading)
    for option in (["--pag-scale", "inf"], ["--seg-sigma", "-1"], ["--cfg-scale", "inf"]):
        assert main(["sample", *option]) == 2
        assert "error" in capsys.readouterr().err


def test_loading_never_prints_the_accelerate_warning(monkeypatch, caplog):
    from diffusers.models import modeling_utils
    monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: False)  # as on a machine without it
    with caplog.at_level(logging.WARNING):
        load_model("fmnist")
    assert "accelerate" not in caplog.text
