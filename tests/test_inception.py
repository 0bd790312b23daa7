"""FD/KID/IS on FID Inception features (RGB models), weights from safetensors only."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

import models
from diffusers import DDIMScheduler, DDPMPipeline
from pagkit import io
from pagkit.cli import main
from pagkit.data import load_images
from pagkit.inception import InceptionV3, load_inception, resize_bilinear_tf1

WHEELS = sorted((Path(__file__).parents[1] / ".venv" / "reference").glob("torch_fidelity-*.whl"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random FID-Inception weights with non-trivial batch-norm statistics, as a safetensors file."""
    torch.manual_seed(0)
    net = InceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    io.save_tensors(path, net.state_dict())
    return path


@pytest.fixture
def torch_fidelity_inception():
    """torch-fidelity's FeatureExtractorInceptionV3, imported from its wheel without the package's
    __init__ (which imports torchvision); sys.modules is left as it was."""
    if not WHEELS:
        pytest.skip("no torch-fidelity wheel in .venv/reference (./run tests downloads it)")
    before = set(sys.modules)
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [f"{WHEELS[-1]}/torch_fidelity"]  # zipimport reads modules inside the wheel
    sys.modules["torch_fidelity"] = package
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as module
        yield module
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]


def test_features_and_logits_equal_torch_fidelity(weights, torch_fidelity_inception, monkeypatch):
    ours = load_inception(weights)
    state = io.load_tensors(weights)
    monkeypatch.setattr(torch_fidelity_inception, "load_state_dict_from_url", lambda *a, **k: state)
    theirs = torch_fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    images = torch.rand(3, 3, 37, 45, generator=torch.Generator().manual_seed(1)) * 2 - 1
    feats, logits = theirs(((images + 1) * 127.5).round().to(torch.uint8))
    ours_feats = ours.features(images)
    torch.testing.assert_close(ours_feats, feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.classify(ours_feats), logits, rtol=1e-5, atol=1e-5)
    grey = images[:, :1]  # one channel → repeated to RGB
    torch.testing.assert_close(ours.features(grey), theirs(((grey + 1) * 127.5).round().to(torch.uint8)
                                                            .expand(-1, 3, -1, -1))[0], rtol=1e-5, atol=1e-5)


def test_tf1_resize_keeps_same_size_and_samples_at_i_times_scale():
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(resize_bilinear_tf1(x, 5), x)
    up = resize_bilinear_tf1(torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]]), 4)  # src = i/2; the last row clamps
    torch.testing.assert_close(up[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(up[0, 0, :, 0], torch.tensor([0.0, 1.0, 2.0, 2.0]))


def test_weights_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Inception weights at .*nope.safetensors"):
        load_inception(tmp_path / "nope.safetensors")
    (tmp_path / "w.pth").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never unpickles"):
        load_inception(tmp_path / "w.pth")
    io.save_tensors(tmp_path / "other.safetensors", {"conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing .*unexpected"):
        load_inception(tmp_path / "other.safetensors")


def test_reference_images_from_a_folder_or_a_safetensors_file(tmp_path):
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    for k in range(3):
        Image.new("RGB", (8, 8), (40 * k, 0, 255)).save(tmp_path / "imgs" / f"{k}.png")
    images = load_images(tmp_path / "imgs", 3, (8, 8))
    assert images.shape == (3, 3, 8, 8) and images[2, 0, 0, 0].item() == pytest.approx(80 / 127.5 - 1) and images[0, 2, 0, 0] == 1
    io.save_tensors(tmp_path / "ref.safetensors", {"images": images})
    assert torch.equal(load_images(tmp_path / "ref.safetensors", 3, (8, 8)), images)
    with pytest.raises(ValueError, match=r"shape \(3, 3, 8, 8\); the model makes \(N, 1, 8, 8\)"):
        load_images(tmp_path / "ref.safetensors", 1, (8, 8))
    with pytest.raises(FileNotFoundError, match="no reference images"):
        load_images(tmp_path / "none", 3, (8, 8))


def test_eval_on_an_rgb_model_with_inception_features(weights, tmp_path, capsys):
    DDPMPipeline(unet=models.unet2d(in_channels=3, out_channels=3, sample_size=8),
                 scheduler=DDIMScheduler()).save_pretrained(tmp_path / "rgb")
    io.save_tensors(tmp_path / "ref.safetensors",
                    {"images": torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1})
    argv = ["eval", "--model", str(tmp_path / "rgb"), "--methods", "none,pag", "--scales", "1",
            "--layers", "down.1", "--num-samples", "6", "--shard-size", "6", "--steps", "2", "--quiet",
            "--inception", str(weights), "--reference", str(tmp_path / "ref.safetensors"), "--out", str(tmp_path / "o")]
    main(argv)
    rows = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["config"]["method"] for r in rows] == ["none", "pag"]
    for r in rows:
        m = r["metrics"]
        assert m["n"] == 6 and m["fd"] > 0 and m["is"] >= 1 and len(m["class_histogram"]) == 1008
    space = json.loads((tmp_path / "o" / "feature_space.json").read_text())
    assert space["features"] == "inception:inception.safetensors"
    assert main(argv[:argv.index("--inception")] + ["--reference", str(tmp_path / "ref.safetensors"),
                                                    "--out", str(tmp_path / "o")]) == 2
    assert "holds results measured on" in capsys.readouterr().err


def test_eval_with_a_missing_weights_file_fails_before_sampling(tmp_path, capsys):
    assert main(["eval", "--inception", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "no Inception weights at" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
