"""The sampling loop over any diffusers scheduler: the one loop of pagkit (sampling, eval, tune, DPS restoration).

    x_T ~ N(0, σ_init²)
    for i, t in enumerate(timesteps):
        ε̃ = guided prediction at x_t (one batched forward, see denoise.py)
        x_{t-1} = scheduler.step(ε̃, t, x_t)
        x_{t-1} = corrector(x_{t-1}, ...)      (optional: e.g. DPS's data consistency, pagkit.restore.dps)
"""
from __future__ import annotations

import inspect

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .backends import detect
from .denoise import GuidedDenoiser


def sample_shape(model, batch_size: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
    """The shape of x_t for ``model`` (its family's backend knows it), at its configured size by default."""
    return detect(model).sample_shape(model, batch_size, height, width)


def initial_noise(model, batch_size: int, generator: torch.Generator | None = None,
                  height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Unit Gaussian noise of the model's sample shape, in its dtype and on its device."""
    param = next(model.parameters())
    return randn_tensor(sample_shape(model, batch_size, height, width), generator=generator, device=param.device,
                        dtype=param.dtype)


def start(scheduler, latents: torch.Tensor, num_inference_steps: int, *, eta: float = 0.0,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """x_T (``latents`` × the scheduler's initial σ), then set the timesteps; also the keyword arguments its
    ``step`` takes (η, generator)."""
    x = latents * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    step_params = set(inspect.signature(scheduler.step).parameters)
    return x, {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_params}


class Corrector:
    """A per-step correction of the loop: ``x_{t-1} ← corrector(x_{t-1}, x=x_t, x_in=..., prediction=ε̃, t=t)``.

    With ``needs_grad`` (the default) the loop tracks gradients from x_t through the guided prediction, so the
    corrector can differentiate through ε̃ (``torch.autograd.grad(..., x)``); the scheduler's own update is not
    differentiated. ``x_in`` is the model's input (``scheduler.scale_model_input(x_t, t)``).
    """

    needs_grad = True

    def __call__(self, x_next: torch.Tensor, *, x: torch.Tensor, x_in: torch.Tensor, prediction: torch.Tensor,
                 t) -> torch.Tensor:
        raise NotImplementedError


def check_class_labels(model, class_labels, null_class_label=None) -> None:
    """A ValueError unless the labels (and CFG's null label) are classes of ``model``'s class embedding."""
    classes = getattr(model, "config", {}).get("num_class_embeds")
    if not classes:
        raise ValueError(f"class labels given, but {type(model).__name__} is unconditional (its config has no "
                         "num_class_embeds)")
    labels = [] if class_labels is None else torch.as_tensor(class_labels).flatten().tolist()
    if not all(isinstance(v, int) for v in labels):
        raise TypeError(f"class labels must be integers, got {class_labels!r}")
    bad = [v for v in labels + ([] if null_class_label is None else [null_class_label]) if not 0 <= v < classes]
    if bad:
        raise ValueError(f"class label {bad[0]} is out of range: {type(model).__name__} has classes "
                         f"0..{classes - 1}")


@torch.no_grad()
def sample(model, scheduler, *, batch_size: int = 1, num_inference_steps: int = 50, guidance=(),
           generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
           class_labels: torch.Tensor | None = None, null_class_label: int | None = None,
           encoder_hidden_states: torch.Tensor | None = None,
           negative_encoder_hidden_states: torch.Tensor | None = None,
           cond: dict | None = None, uncond: dict | None = None,
           height: int | None = None, width: int | None = None, eta: float = 0.0,
           guidance_rescale: float = 0.0, prefix_sharing: bool = True, progress_bar: bool = True,
           callback=None, check_finite: bool = True, corrector: Corrector | None = None) -> torch.Tensor:
    """Draw samples with ``guidance`` (a list of pagkit.CFG/PAG/SEG/SAG terms); returns the final x_0 (model space).

    Conditions: ``class_labels`` (with ``null_class_label`` for CFG's ∅), or
    ``encoder_hidden_states`` (with ``negative_encoder_hidden_states``), or any
    model inputs as ``cond``/``uncond`` dicts. ``eta`` and ``generator`` go to the
    scheduler's step where it takes them (DDIM's η, DDPM's noise).
    ``prefix_sharing=False`` runs every branch in full (see prefix.py; results are the same).
    ``callback(i, t, x)`` is called after each step. ``check_finite``: stop with
    ``pagkit.denoise.NonFiniteGuidance`` where guidance, not the model, makes a step NaN/inf (False: skip).
    ``corrector``: a ``Corrector`` applied to x_{t-1} after each step (DPS's data consistency).
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    denoiser = GuidedDenoiser(model, guidance, scheduler=scheduler, guidance_rescale=guidance_rescale,
                              prefix_sharing=prefix_sharing, check_finite=check_finite)
    param = next(model.parameters())
    cond = dict(cond or {})
    uncond = None if uncond is None else dict(uncond)
    if class_labels is not None or null_class_label is not None:
        check_class_labels(model, class_labels, null_class_label)
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, device=param.device).long().expand(batch_size).clone()
        cond["class_labels"] = class_labels
        if null_class_label is not None:
            uncond = {**(uncond or {}), "class_labels": torch.full_like(class_labels, null_class_label)}
    if encoder_hidden_states is not None:
        cond["encoder_hidden_states"] = encoder_hidden_states
        if negative_encoder_hidden_states is not None:
            uncond = {**(uncond or {}), "encoder_hidden_states": negative_encoder_hidden_states}
    if uncond is not None:
        uncond = {**cond, **uncond}

    if latents is None:
        latents = initial_noise(model, batch_size, generator, height, width)
    else:
        expected = sample_shape(model, batch_size, height, width)
        if not torch.is_tensor(latents) or latents.ndim != len(expected) or latents.shape[1] != expected[1]:
            # (the size may differ from the configured one; the channels may not)
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"latents of shape {shape}; {type(model).__name__} at this size takes "
                             f"{tuple(expected)}")
    x, step_kwargs = start(scheduler, latents, num_inference_steps, eta=eta, generator=generator)
    keep_epsilon_only = denoiser.backend.learned_sigma(model) and \
        scheduler.config.get("variance_type") not in ("learned", "learned_range")
    timesteps = scheduler.timesteps
    track = corrector is not None and corrector.needs_grad  # a graph from x_t through ε̃, for the corrector
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress_bar, leave=False)):
        if track:
            x = x.detach().requires_grad_()
        with torch.set_grad_enabled(track):
            x_in = scheduler.scale_model_input(x, t)
            prediction = denoiser.predict(x_in, t, cond, uncond, progress=i / len(timesteps))
        if keep_epsilon_only:  # ε and σ (ADM/DiT): a scheduler that does not learn the variance takes ε alone
            prediction = prediction[:, :x.shape[1]]
        x_next = scheduler.step(prediction.detach(), t, x.detach(), **step_kwargs, return_dict=False)[0]
        if corrector is not None:
            with torch.set_grad_enabled(track):
                x_next = corrector(x_next, x=x, x_in=x_in, prediction=prediction, t=t)
        x = x_next
        if callback is not None:
            callback(i, t, x)
    return x
