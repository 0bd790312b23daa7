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
    import pagkit.cli.sample as cli  # the module that loads sample's models

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


def test_guidance_that_goes_non_finite_stops_naming_the_step_and_the_term():
    """No silent NaN: a term whose contribution is NaN/inf ends sampling with the step and the term; ε_c itself
    going non-finite is the model's doing and is not blamed on guidance; check_finite=False samples anyway."""
    from dataclasses import dataclass

    import torch
    from diffusers import DDIMScheduler

    import models
    import pagkit
    from pagkit.denoise import NonFiniteGuidance
    from pagkit.methods.base import Contrast

    @dataclass
    class Overflowing(pagkit.GuidanceTerm):  # PAG whose difference overflows float32 at the second step
        scale: float = 1.0

        def bind(self, key, context):
            bound = Contrast(self, key, {"mid_block.attentions.0": pagkit.perturb.Identity()})
            plain = bound.contribution
            bound.contribution = lambda scale, step: plain(scale, step) * (3e38 if step.t < 400 else 1.0) * 1e10
            return bound

    model, scheduler = models.unet2d(), DDIMScheduler()
    with pytest.raises(NonFiniteGuidance, match=r"at the step with t=0 \(progress 0.5\) .*from .*Overflowing\("
                                                r"scale=1"):
        pagkit.sample(model, scheduler, batch_size=2, num_inference_steps=2, guidance=[Overflowing()],
                      progress_bar=False, generator=torch.Generator().manual_seed(0))
    out = pagkit.sample(model, scheduler, batch_size=2, num_inference_steps=2, guidance=[Overflowing()],
                        progress_bar=False, generator=torch.Generator().manual_seed(0), check_finite=False)
    assert not torch.isfinite(out).all()
    finite = pagkit.sample(model, scheduler, batch_size=2, num_inference_steps=2, guidance=[pagkit.PAG(3e3)],
                           progress_bar=False, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(finite).all()  # large but finite guidance is not an error
    nan = torch.full((2, 1, 16, 16), float("nan"))  # the model's own NaN: passed through, not an error
    out = pagkit.sample(model, scheduler, batch_size=2, num_inference_steps=2, guidance=[pagkit.PAG(1.0)],
                        latents=nan, progress_bar=False)
    assert torch.isnan(out).all()
    assert isinstance(NonFiniteGuidance("x"), RuntimeError)  # the CLI's one-line errors catch it
