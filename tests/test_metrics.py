import numpy as np
import pytest
import scipy.linalg
import torch

from pagkit.metrics import (FashionClassifier, FeatureExtractor, PassThrough, frechet_distance,
                            inception_score_from_logits, precision_recall)


def _scipy_fd(a, b):
    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_equals_a_direct_scipy_computation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 16, generator=g)
    b = torch.randn(2000, 16, generator=g) @ (torch.eye(16) + 0.3 * torch.randn(16, 16, generator=g)) + 0.5
    ours = frechet_distance(a, b, PassThrough(16))
    assert ours == pytest.approx(_scipy_fd(a, b), rel=1e-6)


def test_fd_of_a_set_against_itself_is_zero():
    a = torch.randn(1000, 8, generator=torch.Generator().manual_seed(1))
    assert abs(frechet_distance(a, a, PassThrough(8))) < 1e-6
    images = torch.rand(64, 1, 32, 32) * 2 - 1
    assert abs(frechet_distance(images, images, FeatureExtractor(FashionClassifier()))) < 1e-4


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # one split has no spread; the mean is what is checked
def test_inception_score_analogue_on_known_class_mixes():
    # confident and balanced over 10 classes: exp(KL) = exp(log 10) = 10; one class for all: 1; unsure: 1
    confident = 50.0 * torch.eye(10).repeat(100, 1)
    assert inception_score_from_logits(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-4)
    assert inception_score_from_logits(confident[:1].repeat(1000, 1), splits=1)[0] == pytest.approx(1.0)
    assert inception_score_from_logits(torch.zeros(1000, 10), splits=1)[0] == pytest.approx(1.0)


def test_precision_and_recall_on_toy_distributions():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 2, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = torch.randn(500, 2, generator=g) + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # fakes collapsed onto a small part of the real cloud: all precise, little recall
    collapsed = real[real[:, 0] > 1.5][:200]
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.2
    # fakes spread over twice the real support: full recall, lower precision
    wide = torch.randn(2000, 2, generator=g) * 3
    precision, recall = precision_recall(real, wide)
    assert recall > 0.95 and precision < 0.7  # about P(|z| < 3) of the wider cloud, plus the k-NN margin


def test_shipped_classifier_loads_and_reaches_93_percent_on_the_test_set():
    import json

    from pagkit.data import load_fashion_mnist
    from pagkit.metrics import classifier_accuracy, classifier_dir, load_classifier
    config = json.loads((classifier_dir() / "config.json").read_text())
    x, y = load_fashion_mnist("test")
    accuracy = classifier_accuracy(load_classifier(), x, y)
    assert accuracy >= 0.93
    assert accuracy == pytest.approx(config["test_accuracy"], abs=1e-4)


def test_load_classifier_reads_the_architecture_from_config_json(tmp_path):
    from pagkit import io
    from pagkit.metrics import ResNetClassifier, load_classifier
    net = ResNetClassifier(width=4).eval()
    io.save_tensors(tmp_path / "model.safetensors", net.state_dict())
    io.write_json(tmp_path / "config.json", {"arch": "resnet", "width": 4, "num_features": net.num_features})
    loaded = load_classifier(tmp_path)
    assert isinstance(loaded, ResNetClassifier) and loaded.num_features == 16
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.equal(loaded.features(x), net.features(x))
    io.write_json(tmp_path / "config.json", {"arch": "transformer", "width": 4})
    with pytest.raises(ValueError, match="unknown classifier arch"):
        load_classifier(tmp_path)


def test_second_shipped_classifier_is_another_design_and_seed_and_reaches_90_percent():
    import json

    from pagkit.data import load_fashion_mnist
    from pagkit.metrics import (ResNetClassifier, classifier_accuracy, classifier_dir, load_classifier,
                                second_classifier_dir)
    config = json.loads((second_classifier_dir() / "config.json").read_text())
    primary = json.loads((classifier_dir() / "config.json").read_text())
    assert config["arch"] != primary.get("arch", "vgg") and config["seed"] != primary["seed"]
    net = load_classifier(second_classifier_dir())
    assert isinstance(net, ResNetClassifier)
    x, y = load_fashion_mnist("test")
    accuracy = classifier_accuracy(net, x, y)
    assert accuracy >= 0.90
    assert accuracy == pytest.approx(config["test_accuracy"], abs=1e-4)
