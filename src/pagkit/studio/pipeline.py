"""The studio's text-to-image pipelines: a diffusers pipeline folder under ``--models-root``, prompted, guided
through ``pagkit.attach``.

``pagkit sample`` draws denoisers, not pipelines (it has no prompt), so a pipeline's grid is drawn by the
pipeline's own ``__call__`` and the page shows, instead of a command line, the Python that draws the same pixels
(``pipeline_code``; ``tests/test_studio.py`` runs it and compares). Per row: a plain ``cfg:w`` term becomes the
pipeline's ``guidance_scale`` (the pipeline applies CFG itself), every other term goes to ``pagkit.attach``, which
refuses what it cannot add (a rule on CFG, an unknown site) with its own message; the unguided row is the pipeline
at ``guidance_scale=1``. Every row starts from one generator seeded with the seed, so the same noise.

Loading: the folder has passed ``core.check_model`` (under the root, no link out, no pickled file); its
``model_index.json`` must name a diffusers pipeline class and only diffusers / transformers components (no code
from the folder), and every weights file is read with safetensors alone.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from ..load import SCHEDULERS, check_safetensors
from .core import _MODEL_LOCK, _MODELS, Cancelled, Plan, Request, Result, Row, StudioError, grid_image

LIBRARIES = ("diffusers", "transformers")  # where a component's class may come from: no custom code


def load_pipeline(path: str):
    """The pipeline in folder ``path`` (checked by ``core.check_model``), cached, its progress bars off."""
    import diffusers
    key = f"pipeline:{path}"
    with _MODEL_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        index = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
        cls = getattr(diffusers, str(index.get("_class_name")), None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
            raise StudioError(f"{path}/model_index.json names pipeline class {index.get('_class_name')!r}, which "
                              "is not a diffusers pipeline")
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
                continue
            if entry[0] not in LIBRARIES:
                raise StudioError(f"{path}/model_index.json: component {name!r} comes from {entry[0]!r}; the "
                                  f"studio loads only {' and '.join(LIBRARIES)} components (no code from a folder)")
        for weights in sorted(Path(path).rglob("*.safetensors")):
            try:
                check_safetensors(weights)
            except ValueError as err:
                raise StudioError(str(err)) from None
        try:
            pipe = cls.from_pretrained(path, use_safetensors=True)
        except (ValueError, TypeError, OSError) as err:
            raise StudioError(f"{path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        pipe.set_progress_bar_config(disable=True)
        _MODELS[key] = pipe
        return pipe


def _split(terms: list) -> tuple[float, list]:
    """(the pipeline's guidance_scale, the terms for pagkit.attach): a plain CFG term is the pipeline's own."""
    from ..methods import CFG
    plain = [t for t in terms if isinstance(t, CFG) and t.rule is None]  # at most one: check_guidance says so
    return (float(plain[0].scale) if plain else 1.0), [t for t in terms if not any(t is p for p in plain)]


def _scheduler(pipe, name: str, timestep_spacing: str | None):
    import diffusers
    extra = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
    return getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config, **extra)


def plan_pipeline(request: Request, args, model: str) -> Plan:
    """``core.plan`` for a text-to-image pipeline folder: every row checked by ``pagkit.attach`` before any
    sampling. ``args``: the request's numbers, already parsed by ``pagkit sample``'s parser."""
    from .. import attach
    from ..methods.base import check_guidance
    from ..presets import load_preset
    from ..spec import label, parse_spec
    title = Path(model).name
    if args.class_label is not None:
        raise StudioError(f"--class-label {args.class_label}: {title} is a text-to-image pipeline; it takes a "
                          "prompt, not a class")
    if not (request.prompt or "").strip():
        raise StudioError(f"{title} is a text-to-image pipeline: give a prompt (the negative prompt is optional)")
    try:
        rows = [terms for terms in (parse_spec(text) for text in args.guidance or []) if terms]
        rows += [load_preset(path) for path in args.preset or []]
        with _MODEL_LOCK:
            pipe = load_pipeline(model)
            scheduler = _scheduler(pipe, args.scheduler, args.timestep_spacing)
            for terms in rows:
                check_guidance(terms)  # one CFG per row, as anywhere else
                _, attached = _split(terms)
                if attached:
                    with attach(pipe, attached):  # sites and scales checked, the pipeline restored at once
                        pass
    except StudioError:
        raise
    except (ValueError, TypeError, OSError) as err:
        raise StudioError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    rows = [("no guidance", [])] + [(label(terms).replace(" + ", "\n+ "), terms) for terms in rows]
    plan_ = Plan(request, args, pipe, scheduler, rows, False, "", pipeline=True)
    plan_.command = pipeline_code(plan_, model)
    return plan_


def _call(plan_: Plan) -> dict:
    request, args = plan_.request, plan_.args
    return dict(prompt=request.prompt.strip(), negative_prompt=(request.negative_prompt or "").strip() or None,
                num_inference_steps=args.steps, num_images_per_prompt=args.num_images)


def pipeline_code(plan_: Plan, model: str) -> str:
    """The Python that draws ``plan_``'s rows (``rows[label]``: PIL images), pixel for pixel."""
    from ..spec import format_spec
    args = plan_.args
    extra = f", timestep_spacing={args.timestep_spacing!r}" if args.timestep_spacing else ""
    lines = ["import diffusers, torch, pagkit", "from pagkit.spec import parse_spec", "",
             f"pipe = diffusers.{type(plan_.model).__name__}.from_pretrained({model!r}, use_safetensors=True)",
             f"pipe.scheduler = diffusers.{SCHEDULERS[args.scheduler]}.from_config(pipe.scheduler.config{extra})",
             "call = dict(" + ", ".join(f"{k}={v!r}" for k, v in _call(plan_).items()) + ")",
             f"seed = {args.seed}  # every row: one generator with this seed, so the same noise", "rows = {}"]
    for name, terms in plan_.rows:
        w, attached = _split(terms)
        draw = (f"rows[{name.replace(chr(10), ' ')!r}] = pipe(**call, guidance_scale={w!r}, "
                "generator=torch.Generator().manual_seed(seed)).images")
        if attached:
            lines += [f"with pagkit.attach(pipe, parse_spec({format_spec(attached)!r})):", "    " + draw]
        else:
            lines.append(draw)
    return "\n".join(lines)


def draw_pipeline(plan_: Plan, *, progress=None, cancel=None) -> Result:
    """``core.draw`` for a pipeline: each row by the pipeline's ``__call__``, under ``pagkit.attach``."""
    import numpy as np

    from .. import attach
    from ..spec import format_spec
    pipe, args = plan_.model, plan_.args
    rows = []
    with _MODEL_LOCK:
        pipe.scheduler = plan_.scheduler
        for index, (name, terms) in enumerate(plan_.rows):
            def step(pipe_, i, t, tensors, index=index):
                if progress is not None:
                    progress(index, i + 1, args.steps)
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"cancelled at step {i + 1} of {args.steps} of row {index + 1}")
                return tensors
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled before row {index + 1}")
            w, attached = _split(terms)
            start = time.perf_counter()
            with attach(pipe, attached) if attached else contextlib.nullcontext():
                images = pipe(**_call(plan_), guidance_scale=w, generator=torch.Generator().manual_seed(args.seed),
                              callback_on_step_end=step).images
            seconds = time.perf_counter() - start
            # the PIL images' own pixels, in [-1, 1]: report.to_uint8 gives them back exactly
            pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
            rows.append(Row(name, format_spec(terms), pixels.float() / 127.5 - 1, seconds))
    return Result(rows, grid_image(args.model, rows), plan_.command, str(args.model))
