"""Architecture families: everything pagkit knows about one kind of model lives in one file here.

A backend says, for its family:

* which attention computations are **sites** that can be perturbed, with their kind
  (``self``: image tokens only; ``joint``: text and image tokens in one softmax, separate
  projections; ``single``: one [text; image] sequence through one block; for video,
  ``spatial``: the tokens of one frame, ``temporal``: one position across the frames,
  ``spatiotemporal``: every token of the F×H×W grid; a joint or single-stream site of a
  video family has the F×H×W grid as its image tokens);
* which attention computations are **cross-attention** from the image tokens to the text (``cross_sites``,
  kind ``cross``): not perturbable sites (PAG and its siblings never select them), but where a method that
  contrasts two conditions inside the network (NAG) acts;
* where the image tokens sit in each site's sequence, and their grid (``layout``);
* the **stages** that prefix sharing may run once for the conditional and perturbed rows;
* which model inputs are **not** per sample (rotary tables, position ids), so nothing is
  sliced or concatenated by a guess on its shape;
* the call convention and the sample shape.

How a perturbed attention is computed is the same for every family: the model's own
processor runs (its QK-norm and RoPE included), and ``routing.py`` replaces the
scaled-dot-product attention it calls, on the perturbed rows only. Adding a family is
one new file with a ``Backend`` subclass, registered with ``@register``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..perturb import TokenLayout

SITE_KINDS = ("self", "joint", "single", "spatial", "temporal", "spatiotemporal")
CROSS_KIND = "cross"  # image (video) queries attending to text keys: ``Backend.cross_sites``, never a perturbable site
SELF_KINDS = ("self", "spatial", "temporal", "spatiotemporal")  # sites whose whole sequence is image (video) tokens


@dataclass(frozen=True)
class Site:
    """One perturbable attention computation.

    ``downsampling``: input pixels (or latent cells) per image token along each axis, so the image grid of a
    forward is ceil(H/f) × ceil(W/f) of the grid ``Backend.forward_info`` reports. ``image_first``: on a joint or
    single-stream site, whether the image tokens come before the text tokens in the sequence.
    """

    name: str
    kind: str
    heads: int
    channels: int
    downsampling: int | None = 1
    image_first: bool = True
    attention: object = field(default=None, compare=False, repr=False)
    """For attention that does not call SDPA (einsum + softmax): ``attention(module, x) -> (q, k, v, finish)``,
    q/k/v as (B, heads, S, d) and ``finish(out)`` the module's output from the attention output (see custom.py)."""
    attend: object = field(default=None, compare=False, repr=False)
    """With ``attention``, for a kernel that is not softmax (linear attention): ``attend(perturbation, q, k, v,
    layout) -> out`` computes a perturbation there, or refuses it; default ``perturbation.attend(q, k, v, layout)``."""


@dataclass
class ForwardInfo:
    """What one forward's inputs say about token layouts: the image grid (in the units sites divide by) and, for
    video, the frames of the token grid (F of F×H×W, after any temporal patching)."""

    hw: tuple[int, int] | None = None
    text_tokens: int | None = None
    frames: int | None = None
    text_tokens_per_sample: tuple[int, ...] | None = None  # where they differ (Lumina2's captions of a batch)


class Backend:
    """Base class of a family. Subclasses set ``name``/``model_classes`` and override what differs."""

    name = "base"
    model_classes: tuple[str, ...] = ()
    input_name = "hidden_states"  # the model's first argument
    timestep_name = "timestep"  # the model's timestep argument (HiDream: ``timesteps``, Z-Image: ``t``)
    shared_inputs: frozenset = frozenset()  # model/stage inputs that are NOT per sample
    timestep_divisor = 1.0  # what its diffusers pipelines divide the scheduler's timestep by
    tested_against = ""  # for the README's family table

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    def sites(self, model: nn.Module) -> list[Site]:
        raise NotImplementedError

    def cross_sites(self, model: nn.Module) -> list[Site]:
        """The cross-attention layers (kind ``cross``: image or video queries, text keys and values), in forward
        order; [] where the family has none (joint and single-stream families mix text in their sites)."""
        return []

    def stages(self, model: nn.Module) -> list[str] | None:
        """Top-level stages in forward order whose inputs are all per sample, or None if not a plain list."""
        return None

    def forward_info(self, model: nn.Module, x: torch.Tensor, kwargs: dict) -> ForwardInfo:
        return ForwardInfo(hw=tuple(x.shape[-2:]) if x.ndim == 4 else None)

    def sample_info(self, model: nn.Module) -> ForwardInfo | None:
        """The layout facts of a forward at the model's configured sample size (for ``pagkit layers``), if known."""
        size = getattr(model, "config", {}).get("sample_size")
        if size is None:
            return None
        return ForwardInfo(hw=(size, size) if isinstance(size, int) else tuple(size))

    def grid(self, site: Site, info: ForwardInfo | None) -> tuple[int, ...] | None:
        """The token grid one attention call of ``site`` covers: (H, W); for video (F, H, W), of which a spatial
        site sees one frame (1, H, W) and a temporal site one position (F, 1, 1)."""
        if info is None or info.hw is None or not site.downsampling:
            return None
        grid = (math.ceil(info.hw[0] / site.downsampling), math.ceil(info.hw[1] / site.downsampling))
        if info.frames is None:
            return grid
        return {"spatial": (1, *grid), "temporal": (info.frames, 1, 1)}.get(site.kind, (info.frames, *grid))

    def layout(self, site: Site, seq_len: int, info: ForwardInfo | None) -> TokenLayout:
        grid = self.grid(site, info)
        if site.kind in SELF_KINDS or site.kind == CROSS_KIND:  # a cross site's queries are all image tokens
            return TokenLayout.self_attention(seq_len, grid)
        return self.image_span(site, seq_len, grid, site.image_first)

    def segment_layouts(self, site: Site, seq_len: int, info: ForwardInfo | None, rows: int) -> list[TokenLayout]:
        """The layout of each of ``rows`` rows of one branch (row j is sample j), for a family whose layout varies
        by sample; by default every row has ``layout``."""
        return [self.layout(site, seq_len, info)] * rows

    @staticmethod
    def image_span(site: Site, seq_len: int, grid: tuple[int, ...] | None, image_first: bool) -> TokenLayout:
        """The image tokens of ``grid`` at the start (or end) of a sequence of ``seq_len``; the rest is not image."""
        if grid is None:
            raise ValueError(f"pagkit cannot tell where the image tokens of {site.kind} site {site.name} are: "
                             "the forward's image grid is unknown")
        n = math.prod(grid)
        if n > seq_len:
            raise ValueError(f"{site.name}: {n} image tokens expected in a sequence of {seq_len}")
        return TokenLayout(seq_len, (0, n) if image_first else (seq_len - n, seq_len), grid)

    def call(self, forward, x: torch.Tensor, t, kwargs: dict) -> torch.Tensor:
        """The model's prediction (ε, v or flow velocity, as the model was trained) for a batch."""
        out = forward(x, timestep=t, **kwargs, return_dict=False)
        if torch.is_tensor(out):
            return out
        return out[0] if isinstance(out, (tuple, list)) else out.sample

    def model_output(self, model: nn.Module, out, inputs: dict, return_dict: bool):
        """What the model's forward returns to a caller (a pipeline) for the guided prediction ``out`` (in the
        model's form: ``caller_output``) of a call with ``inputs`` (as ``per_sample_inputs`` gave them): its sample,
        and whatever the model returns beside it (Flux.2-klein's KV cache at its extract step)."""
        from diffusers.models.unets.unet_2d import UNet2DOutput
        return UNet2DOutput(sample=out) if return_dict else (out,)

    def check_step(self, model: nn.Module, inputs: dict, terms: list, patches: dict, captures: dict) -> None:
        """Refuse, with one clear error before the model runs, a guided step whose ``terms`` (the active ones),
        ``patches`` (site or block name → patch, over every branch) or ``captures`` (sites whose attention map a
        term reads: SAG) a call with ``inputs`` cannot take. By default every step is fine."""

    def shares_prefix(self, inputs: dict) -> bool:
        """Whether prefix sharing may run the early stages of a call with ``inputs`` on fewer rows: False where an
        input that holds rows is no tensor the stages are given (Flux.2-klein's KV cache)."""
        return True

    def perturbs_call(self, site: Site, call: int, info: ForwardInfo | None) -> bool:
        """Whether the ``call``-th attention call (from 0) during one call of ``site``'s module holds the queries a
        perturbation acts on; False: it runs as the model's own on every row (Flux.2-klein's reference tokens,
        attending only among themselves at its KV-cache extract step)."""
        return True

    def attend(self, site: Site, perturbation, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               layout: TokenLayout, attn_mask, scale) -> torch.Tensor:
        """The perturbed attention of rows q, k, v ((B, heads, S, d) as SDPA takes them) at ``site``, ``layout`` the
        queries' sequence: ``perturbation.attend``. A family whose queries attend to keys of a longer sequence
        (Flux.2-klein's cached reference K/V) says here what the perturbation means."""
        return perturbation.attend(q, k, v, layout, attn_mask, scale)

    def per_sample_inputs(self, model: nn.Module, x: torch.Tensor, kwargs: dict) -> dict:
        """The inputs of a call as its caller (a pipeline) gave them, with one row per sample of ``x``: a family
        whose call convention folds frames into an input's rows unfolds it here, and its ``call`` folds it back."""
        return kwargs

    def input_batch(self, model: nn.Module, x) -> torch.Tensor:
        """The caller's model input ``x`` as one (B, …) tensor: a family whose model takes a list of samples
        (Z-Image) stacks it here, its ``call`` unbinds it, and ``caller_output`` gives a caller the model's form."""
        return x

    def caller_output(self, model: nn.Module, out: torch.Tensor):
        """The batch tensor ``call`` returned, as the model itself returns its sample (the inverse of
        ``input_batch``)."""
        return out

    def scheduler_timestep(self, t) -> float:
        """The scheduler's timestep of a model call whose timestep argument is ``t`` (its first entry)."""
        return (float(t.flatten()[0]) if torch.is_tensor(t) else float(t)) * self.timestep_divisor

    def attention_rows(self, site: Site, call: int, attention_batch: int, model_batch: int | None):
        """The model-batch row of each row of the ``call``-th attention call (from 0) of ``site`` during one call
        of its module, non-decreasing; None (the default) when attention row r is model row r. A family that
        folds frames or positions into the batch, or attends one sample per call, says so here.
        ``model_batch``: rows of the model's input batch, where the caller gave it."""
        return None

    def skip_blocks(self, model: nn.Module) -> list[str] | None:
        """The blocks a skip method (SLG) may make return their input, in forward order; None: none known.

        The default: the stages that hold a site (a transformer family's blocks)."""
        stages = self.stages(model)
        if stages is None:
            return None
        names = [s.name for s in self.sites(model)]
        return [st for st in stages if any(n == st or n.startswith(st + ".") for n in names)]

    def token_blocks(self, model: nn.Module) -> list[str] | None:
        """The blocks whose token input a token perturbation (TPG) may permute, in forward order; None: none known.

        The default: the skip blocks (a transformer family's blocks)."""
        return self.skip_blocks(model)

    def token_span(self, model: nn.Module, block: str, tokens: torch.Tensor, info: ForwardInfo | None
                   ) -> tuple[int, int] | None:
        """Where the image tokens of ``block``'s token input (its first argument, ``hidden_states``) lie along
        dim 1; None for a (B, C, H, W) input, whose H·W positions are the tokens.

        The default reads a (B, N, C) input as the sequence of the first site the block holds: all of it for an
        image site, the image span of its layout for a joint or single-stream site (an image-only stream of a
        double-stream block is all image tokens)."""
        if tokens.ndim == 4:
            return None
        if tokens.ndim != 3:
            raise ValueError(f"pagkit cannot tell the tokens of block {block}'s input of shape {tuple(tokens.shape)}")
        site = next((s for s in self.sites(model) if s.name == block or s.name.startswith(block + ".")), None)
        if site is None:
            raise ValueError(f"block {block} holds no site of {type(model).__name__}, so pagkit cannot tell where "
                             "its image tokens are (Backend.token_span)")
        return self.layout(site, tokens.shape[1], info).image

    def skip_output(self, module: nn.Module, args: tuple, kwargs: dict, out):
        """What block ``module`` returns when skipped: its input(s), in the structure of its real output ``out``.

        The default covers a block that maps one tensor to one of the same shape; a family whose blocks return
        several states (image and text) says which input each one is."""
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        if torch.is_tensor(out) and torch.is_tensor(x) and x.shape == out.shape:
            return x
        raise ValueError(f"pagkit cannot skip {type(module).__name__} blocks of the {self.name} family: it does not "
                         "know which of their inputs each output is (Backend.skip_output)")

    def module_rows(self, name: str, module_batch: int, model_batch: int | None):
        """The model-batch row of each row of a routed block's batch (for ``SKIP``), as ``attention_rows`` for
        sites; None (the default) when they are the model's rows. A family that folds frames into the batch of
        its blocks says so here."""
        return None

    def learned_sigma(self, model: nn.Module) -> bool:
        """Whether the output holds ε and a variance (2C channels, as DiT/ADM); only ε is guided."""
        config = getattr(model, "config", {})
        out, inp = config.get("out_channels"), config.get("in_channels")
        return bool(out and inp and out == 2 * inp)

    def sample_shape(self, model: nn.Module, batch_size: int, height: int | None, width: int | None
                     ) -> tuple[int, ...]:
        config = model.config
        size = config.get("sample_size")
        if isinstance(size, int):
            size = (size, size)
        if height is None or width is None:
            if size is None:
                raise ValueError("the model's config has no sample_size; pass height= and width=")
            height, width = height or size[0], width or size[1]
        return (batch_size, config.get("in_channels"), height, width)


def skip_video_and_text(module: nn.Module, args: tuple, kwargs: dict, out):
    """``skip_output`` of a video family's joint block (CogVideoX, Mochi, HunyuanVideo double- and single-stream):
    it returns (hidden_states, encoder_hidden_states), so a skipped one returns both as they came in (as the
    official STG code's ``forward_with_stg``)."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
    return bound["hidden_states"], bound["encoder_hidden_states"]


BACKENDS: list[Backend] = []


def register(cls):
    """Class decorator: add a family's backend to the registry (earlier registrations are tried first)."""
    BACKENDS.append(cls())
    return cls


def detect(model: nn.Module) -> Backend:
    """The backend of ``model``'s family, or one clear error naming the supported families.

    A model given a backend by ``pagkit.adapt`` (your own PyTorch model) uses that one.
    """
    own = getattr(model, "_pagkit_backend", None)
    if own is not None:
        return own
    for backend in BACKENDS:
        if backend.matches(model):
            return backend
    supported = ", ".join(c for b in BACKENDS for c in b.model_classes)
    raise ValueError(f"pagkit does not know the model family of {type(model).__name__}. Supported: {supported}. "
                     "For your own model, describe it with pagkit.adapt(model, sites=..., call=...); to add a "
                     "family, write a Backend subclass in a new file under src/pagkit/backends/ "
                     "(see backends/__init__.py)")


# the families, most specific first
from . import (unet, sd3, flux, flux2, chroma, qwenimage, auraflow, cogview4, lumina2,  # noqa: E402,F401
               wan, cogvideox, hunyuan_video, hunyuan_video15, ltx, ltx2, mochi, sana, hidream, zimage, transformer2d, generic)
from . import animatediff  # noqa: E402,F401
