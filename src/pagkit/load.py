"""Load a diffusers denoiser (and its scheduler) from a folder, or a model pagkit ships, by name.

A folder may be a diffusers pipeline (``model_index.json`` with ``unet/`` or
``transformer/``) or a single model folder (``config.json`` + safetensors).
Weights are read with safetensors only: a folder holding only pickled
``.bin``/``.pt`` weights is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

from .io import InputNotFound, NotAFolder

# pickle-based weight files: loading one can run any code, so pagkit refuses them and says why
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
NEVER_UNPICKLES = ("pagkit never unpickles (loading a pickle can run arbitrary code): convert it once with "
                   "safetensors.torch.save_file, or save the model with save_pretrained(safe_serialization=True)")

SHIPPED_DIR = Path(__file__).parent / "models"
SCHEDULERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler", "pndm": "PNDMScheduler", "unipc": "UniPCMultistepScheduler",
}


# shipped models a copy may lack (their weights are made here, not downloaded): how to make each one again
TO_TRAIN = {
    "fmnist-weak": "the fmnist run's EMA snapshot at 25% of its first budget (step 1500 of --max-steps 6000), the "
                   "weak model for pagkit.AutoGuidance, missing from this copy; make it with `pagkit train --out "
                   "runs/fmnist-weak --max-steps 6000 --stop-at-step 1500` (about 30 min on one core) and give "
                   "weak_model=runs/fmnist-weak/ema-25pct, or export it with pagkit.train.export_model(..., "
                   "snapshot='ema-25pct')",
}


def shipped_models() -> dict[str, Path]:
    """The shipped models by name: every folder under ``models/`` that is a diffusers pipeline (a
    ``model_index.json``), with its card (``card.json``, ``README.md``), e.g. fmnist, fmnist-cond, fmnist-weak."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED_DIR.iterdir()) if (p / "model_index.json").is_file()}


def resolve_model_path(model: str | Path) -> Path:
    shipped = shipped_models()
    if isinstance(model, str) and model in shipped:
        return shipped[model]
    path = Path(model)
    if not path.exists():
        names = ", ".join(shipped) or "none yet"
        hint = f"; {model} is {TO_TRAIN[model]}" if isinstance(model, str) and model in TO_TRAIN else ""
        raise InputNotFound(f"model {str(model)!r} not found: not a folder, and not a shipped model "
                                f"(shipped: {names}){hint}")
    if not path.is_dir():
        if path.suffix.lower() in PICKLED_SUFFIXES:
            raise NotAFolder(f"model path {str(path)!r} is a pickled {path.suffix} file; {NEVER_UNPICKLES}")
        raise NotAFolder(f"model path {str(path)!r} is a file; give the diffusers model or pipeline folder")
    return path


def _model_folder(path: Path) -> Path:
    for sub in ("unet", "transformer"):
        if (path / sub / "config.json").is_file():
            return path / sub
    if (path / "config.json").is_file():
        return path
    raise InputNotFound(f"{path} holds no diffusers model: expected config.json, unet/config.json or "
                            "transformer/config.json")


def load_model(model: str | Path, dtype: torch.dtype = torch.float32):
    """The denoiser of a folder or shipped name, in eval mode."""
    folder = _model_folder(resolve_model_path(model))
    config = json.loads((folder / "config.json").read_text())
    class_name = config.get("_class_name")
    cls = getattr(diffusers, class_name or "", None)
    if class_name is None:
        raise ValueError(f"{folder}/config.json names no model class (_class_name): not a diffusers model "
                         "folder (give a UNet or transformer folder, or a pipeline folder holding one)")
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{folder}/config.json names model class {class_name!r}, which is not a diffusers "
                         "model (give a UNet or transformer folder, or a pipeline folder holding one)")
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLED_SUFFIXES)
        if pickled:
            raise ValueError(f"{folder} holds only pickled weights ({', '.join(pickled)}); {NEVER_UNPICKLES}")
        raise InputNotFound(f"{folder} has no .safetensors weights")
    for path in weights:  # a corrupt or truncated file fails here in one line, not deep inside diffusers
        check_safetensors(path)
    # low_cpu_mem_usage=False: loads without accelerate, and without diffusers' warning that it is missing
    return cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, low_cpu_mem_usage=False).eval()


def check_safetensors(path: str | Path) -> None:
    """Raise ValueError if ``path`` is not a readable safetensors file (its header and every tensor's extent)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                f.get_slice(name).get_shape()
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from None


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # diffusers' ``timestep_spacing`` values


def load_scheduler(model: str | Path, name: str | None = None, timestep_spacing: str | None = None):
    """The model's own scheduler config (if the folder has one), as scheduler ``name`` (see SCHEDULERS).

    ``timestep_spacing`` (leading | trailing | linspace) overrides the config's; None keeps it (the shipped
    models: ``leading``, so DDIM-20 starts at t = 950; ``trailing`` starts at t = 999).
    """
    path = resolve_model_path(model)
    config = {}
    if (path / "scheduler" / "scheduler_config.json").is_file():
        config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    if name is None:
        class_name = config.get("_class_name", "DDIMScheduler")
    elif name in SCHEDULERS:
        class_name = SCHEDULERS[name]
    else:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if timestep_spacing is not None:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep spacing {timestep_spacing!r}; choose one of "
                             f"{', '.join(TIMESTEP_SPACINGS)}")
        config = {**config, "timestep_spacing": timestep_spacing}
    return getattr(diffusers, class_name).from_config(config)


def default_timestep_spacing(model: str | Path, name: str | None = None) -> str:
    """The spacing ``load_scheduler(model, name)`` uses when none is given."""
    return load_scheduler(model, name).config.timestep_spacing
