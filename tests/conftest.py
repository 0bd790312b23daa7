import pytest
import torch

# Tiny models: one thread is fastest, and it keeps the suite from fighting other jobs for the 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny 32×32 DDPM pipeline and the two tiny feature classifiers, for sweeps, tunes and killed runs."""
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    from pagkit import io
    from pagkit.metrics import FashionClassifier, ResNetClassifier
    from pagkit.train import unet_config
    root = tmp_path_factory.mktemp("eval-assets")
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**unet_config(False, "tiny")), scheduler=DDIMScheduler()).save_pretrained(
        root / "model")
    io.save_tensors(root / "classifier" / "model.safetensors", FashionClassifier(width=8).state_dict())
    io.write_json(root / "classifier" / "config.json", {"width": 8, "num_features": 128})
    # the second network: another design (config.json names it)
    io.save_tensors(root / "classifier-b" / "model.safetensors", ResNetClassifier(width=4).state_dict())
    io.write_json(root / "classifier-b" / "config.json", {"arch": "resnet", "width": 4, "num_features": 16})
    return root
