"""pagkit inside an unmodified diffusers pipeline, by wrapping its denoiser's forward.

    with pagkit.attach(pipe, pagkit.PAG(3.0, layers="mid")):
        image = pipe(prompt, guidance_scale=7.5).images[0]

The pipeline keeps doing its own CFG. For its conditional half the wrapper
returns ε_c' = ε_c + Δ/w (Δ = the PAG/SEG/SAG terms), so the pipeline's
ε_u + w(ε_c' − ε_u) is exactly ε_u + w(ε_c − ε_u) + Δ. Without CFG it returns
ε_c + Δ. All branches still run in one batched forward. Pipelines that run CFG
as a second, unconditional call (Flux's and Qwen-Image's ``true_cfg_scale`` with a
negative prompt) get ε_c + Δ/w from the conditional call and the plain ε_u from
the other. Combination rules (APG, CFG-Zero*) on PAG/SEG/SLG/SAG terms work
here (they change only Δ; CFG-Zero*'s zero-init zeroes both of the pipeline's
predictions); a rule on the pipeline's own CFG cannot, and is refused. On exit,
also after an exception, the denoiser's forward and processors are as before.

A term with ``fold=True`` perturbs the pipeline's own unconditional prediction instead of adding rows: the ∅ half
of its [∅; c] batch (or its separate ∅ call) gets the perturbation, and the pipeline's combination is then
ε̂_u + w(ε_c − ε̂_u), at CFG's cost. Where the pipeline runs no CFG it is refused (see ``_check_fold``).
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager

import torch

from .batch import split_rows
from .denoise import GuidedDenoiser
from .guidance import CFG, check_guidance


# Pipelines whose CFG batch puts the conditional half first (diffusers' DiT); all others put ∅ first.
_COND_FIRST = ("DiTPipeline", "ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline",
               "ZImageControlNetPipeline", "ZImageControlNetInpaintPipeline")
# Pipelines whose CFG is ε_c + w(ε_c − ε_u) (Z-Image): diffusers' ε_u + w(ε_c − ε_u) at scale w + 1.
_CFG_PLUS_ONE = _COND_FIRST[1:]


def _scalar(timestep) -> float:
    """A call's timestep as one number (a tensor holds the same t for every row)."""
    return float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)


def _pipeline_cfg_scale(pipe, call_args: dict, timestep=None) -> float | None:
    """The scale of the CFG the pipeline applies to a [∅; c] batch at ``timestep`` (the scheduler's), or None.

    SD-family pipelines expose it (``do_classifier_free_guidance``). Pipelines with a
    ``true_cfg_scale`` (Flux, Qwen-Image) never batch CFG: their ``guidance_scale`` is a
    distilled-guidance input of the model. PixArt and DiT keep it in a local variable,
    so it is read off the arguments of the running ``__call__`` (they guide exactly
    when guidance_scale > 1). CogVideoX's ``use_dynamic_cfg`` sets each step's scale only after
    the model call, so it is computed here with the pipeline's own formula.
    """
    if call_args.get("use_dynamic_cfg") and timestep is not None:
        return _dynamic_cfg_scale(pipe, call_args, timestep)
    if _truncated_cfg(call_args, timestep):
        return None  # this step runs one plain batch
    try:
        doing_cfg = bool(pipe.do_classifier_free_guidance)
        plus = 1.0 if type(pipe).__name__ in _CFG_PLUS_ONE else 0.0
        return float(pipe.guidance_scale) + plus if doing_cfg else None
    except AttributeError:
        if "true_cfg_scale" in call_args:
            return None
        w = call_args.get("guidance_scale")
        return float(w) if w is not None and w > 1.0 else None


def _fold_without_cfg(pipe, folding) -> ValueError:
    names = ", ".join(f"{type(t).__name__}(fold=True)" for t in folding)
    return ValueError(f"{names} perturbs the unconditional prediction of {type(pipe).__name__}'s own CFG, but this "
                      "call runs no CFG (e.g. guidance_scale <= 1, or true_cfg_scale <= 1 or no negative prompt "
                      "where the pipeline has one): turn the pipeline's CFG on, or drop fold to add the term's own "
                      "perturbed rows")


def _check_fold(pipe, call_args: dict, folding) -> None:
    """``fold=True`` terms need the pipeline's CFG: a call whose arguments switch it off for the whole run is refused
    here, before its first step. Where the arguments do not tell (no ``guidance_scale``, a pipeline with a guider),
    the first model call without CFG on a step where the term acts refuses instead (``_wrap_denoiser``)."""
    if not folding or getattr(pipe, "guider", None) is not None:
        return
    if "true_cfg_scale" in call_args:  # Flux, Qwen-Image: CFG only as a second call with a negative prompt
        runs_cfg = _separate_cfg_scale(call_args) is not None
    elif call_args.get("guidance_scale") is not None:
        w = float(call_args["guidance_scale"])
        runs_cfg = w > 0 if type(pipe).__name__ in _CFG_PLUS_ONE else w > 1  # Z-Image guides when w > 0
    else:
        return
    if not runs_cfg:
        raise _fold_without_cfg(pipe, folding)


def _check_call(pipe, call_args: dict) -> None:
    """The arguments of a pipeline call that pagkit's terms cannot be added under, refused before its first step."""
    if call_args.get("cfg_normalization"):
        raise ValueError(f"{type(pipe).__name__}'s cfg_normalization clamps the guided prediction to a multiple of "
                         "‖ε_c‖, which pagkit's terms change: set cfg_normalization=False under pagkit.attach")
    if _AudioVideoStreams.guides(_unwrapped(getattr(pipe, "transformer", None))) and (
            (call_args.get("guidance_rescale") or 0) > 0 or (call_args.get("audio_guidance_rescale") or 0) > 0):
        raise ValueError("LTX2Pipeline's guidance_rescale (0.7 by default) rescales towards the std of x̂₀_c, "
                         "which pagkit's terms change: pass guidance_rescale=0 and audio_guidance_rescale=0 "
                         "under pagkit.attach")


def _truncated_cfg(call_args: dict, timestep) -> bool:
    """Z-Image's ``cfg_truncation`` c ≤ 1: steps whose (1000 − T)/1000 exceeds c run without CFG (the pipeline's
    rule, on the scheduler timestep T)."""
    c = call_args.get("cfg_truncation")
    if c is None or float(c) > 1 or timestep is None:
        return False
    return (1000 - _scalar(timestep)) / 1000 > float(c)


def _dynamic_cfg_scale(pipe, call_args: dict, timestep) -> float | None:
    """CogVideoX's (and ConsisID's) dynamic CFG at the scheduler timestep t, as the pipelines write it:
    w(t) = 1 + g·(1 − cos(π·((N − t)/N)⁵))/2, with g the ``guidance_scale`` argument and N the steps run
    (``pipe._num_timesteps``). t is the timestep itself (0–999), not the step index: diffusers' quirk, kept,
    since the pipeline applies exactly this w. No CFG batch unless g > 1 (the pipelines' own test)."""
    g = float(call_args["guidance_scale"])
    if g <= 1.0:
        return None
    n, t = pipe._num_timesteps, _scalar(timestep)
    return 1 + g * ((1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2)


def _separate_cfg_scale(call_args: dict) -> float | None:
    """The scale of a CFG run as a second, unconditional call (``true_cfg_scale`` > 1 and a negative prompt), or None.

    The rule is FluxPipeline's and QwenImagePipeline's: negative embeddings count only with their companion
    (``negative_pooled_prompt_embeds`` / ``negative_prompt_embeds_mask``) where the pipeline takes one.
    """
    w = call_args.get("true_cfg_scale")
    if w is None or w <= 1.0:
        return None
    if call_args.get("negative_prompt") is not None:
        return float(w)
    negative = [k for k in ("negative_prompt_embeds", "negative_pooled_prompt_embeds", "negative_prompt_embeds_mask")
                if k in call_args]
    return float(w) if negative and all(call_args[k] is not None for k in negative) else None


def _guider_cfg_scale(pipe) -> float | None:
    """The CFG scale this step of a pipeline that runs CFG through a diffusers guider (HunyuanVideo 1.5: the
    conditional and unconditional predictions as two calls, named "pred_cond" / "pred_uncond"), or None when
    the guider runs only the conditional call (guidance_scale 1, or outside its start/stop)."""
    guider = getattr(pipe, "guider", None)
    if guider is None or not guider._enabled or guider.num_conditions < 2:
        return None
    return float(guider.guidance_scale) + (1.0 if guider.use_original_formulation else 0.0)  # ε_c + w(ε_c − ε_u)


def _check_guider(pipe) -> None:
    """pagkit adds its terms around the pipeline's CFG; a guider that is itself another method (diffusers'
    PAG, APG, SLG guiders) or rescales would change what the terms are added to."""
    from diffusers.guiders import ClassifierFreeGuidance
    guider = getattr(pipe, "guider", None)
    if guider is None:
        return
    if type(guider) is not ClassifierFreeGuidance:
        raise ValueError(f"{type(pipe).__name__}'s guider is {type(guider).__name__}: pagkit.attach works with "
                         "diffusers' ClassifierFreeGuidance guider (pagkit's own terms and rules replace the others)")
    if guider.guidance_rescale:
        raise ValueError(f"{type(pipe).__name__}'s guider has guidance_rescale={guider.guidance_rescale}: it would "
                         "rescale towards the guided conditional prediction; set it to 0 under pagkit.attach")


def _progress(pipe, timestep, divisor: float = 1.0) -> float:
    """Step index ÷ number of steps, found by the scheduler's own timesteps (flow-matching ones too).

    ``divisor``: what the pipeline divided the scheduler's timestep by before calling the model (Flux: 1000).
    """
    t = _scalar(timestep) * divisor
    timesteps = getattr(pipe.scheduler, "timesteps", None)
    if timesteps is not None and len(timesteps):
        hits = (timesteps.float() - t).abs().argmin()
        if float((timesteps[hits].float() - t).abs()) < 1e-3 * max(1.0, abs(t)):
            return int(hits) / len(timesteps)
        step = getattr(pipe.scheduler, "step_index", None)
        if step is not None:
            return min(int(step), len(timesteps) - 1) / len(timesteps)
    return 1.0 - t / pipe.scheduler.config.get("num_train_timesteps", 1000)


@contextmanager
def _recording_call_arguments(pipe, call_args: dict, on_call=None):
    """Swap in a subclass of the pipeline whose ``__call__`` records its bound arguments into ``call_args``;
    restore on exit."""
    cls = type(pipe)
    signature = inspect.signature(cls.__call__)

    def recording_call(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        call_args.clear()
        call_args.update(bound.arguments)
        if on_call is not None:
            on_call()
        return cls.__call__(self, *args, **kwargs)

    pipe.__class__ = type(cls.__name__, (cls,), {"__call__": recording_call, "__module__": cls.__module__})
    try:
        yield call_args
    finally:
        pipe.__class__ = cls


# LTX-2 pipelines whose step is x̂₀_c + [CFG](w − 1)(x̂₀_c − x̂₀_u) + [STG] s(x̂₀_c − x̂₀_stg) + [mod](m − 1)(x̂₀_c − x̂₀_mod),
# per stream (video, audio), in x̂₀ = x − σv (affine in v, so a term's Δ in v passes through unchanged)
_LTX2_PIPELINES = ("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline")


class _AudioVideoStreams:
    """LTX-2's transformer predicts (video, audio). The denoiser sees both packed into one (B, N·C + T·C_a) tensor,
    so every term guides both streams with one batched forward; the conditional rows are divided per stream by the
    factor on x̂₀_c in the pipeline's own combination (CFG, STG and modality isolation each use x̂₀_c), so that its
    step adds exactly Δ. Its STG and modality-isolation calls ("uncond_stg", "uncond_modality") run plain."""

    plain_contexts = ("uncond_stg", "uncond_modality")

    @staticmethod
    def guides(model) -> bool:
        """Whether ``model`` predicts (video, audio) as LTX-2 does."""
        return type(model).__name__ == "LTX2VideoTransformer3DModel"

    def __init__(self, pipe, model, terms):
        if type(pipe).__name__ not in _LTX2_PIPELINES:
            raise ValueError(f"pagkit.attach on LTX-2 supports {', '.join(_LTX2_PIPELINES)}; "
                             f"{type(pipe).__name__} combines its predictions another way")
        needs_one_stream = [type(t).__name__ for t in terms if t.needs_scheduler]
        if needs_one_stream:
            raise ValueError(f"{', '.join(needs_one_stream)} needs the scheduler's x̂₀ of one stream; under "
                             "pagkit.attach LTX-2's video and audio are guided together (use PAG, SEG, STG, SLG, "
                             "TPG or NAG there)")
        self.pipe, self.config = pipe, model.config
        self.shapes: dict = {}

    def packed(self, forward):
        def packed_forward(*args, **kwargs):
            video, audio = forward(*args, **kwargs)[:2]
            self.shapes["video"], self.shapes["audio"] = video.shape[1:], audio.shape[1:]
            return (torch.cat([video.flatten(1), audio.flatten(1)], dim=1),)
        return packed_forward

    def divisors(self, x, inputs) -> tuple[torch.Tensor, bool]:
        """The (1, N·C + T·C_a) per-stream factors on x̂₀_c, and whether this call is a [∅; c] CFG batch."""
        p = self.pipe  # its guidance_rescale was refused at the call's start (_check_call)
        cfg, stg, mod = (p.do_classifier_free_guidance, p.do_spatio_temporal_guidance,
                         p.do_modality_isolation_guidance)

        def factor(w, s, m):
            return 1.0 + (w - 1.0 if cfg else 0.0) + (s if stg else 0.0) + (m - 1.0 if mod else 0.0)
        video = factor(p.guidance_scale, p.stg_scale, p.modality_scale)
        audio = factor(p.audio_guidance_scale, p.audio_stg_scale, p.audio_modality_scale)
        n_video = x.shape[1] * self.config.out_channels
        n_audio = inputs["audio_hidden_states"].shape[1] * self.config.audio_out_channels
        return torch.cat([x.new_full((1, n_video), video), x.new_full((1, n_audio), audio)], dim=1), cfg

    def output(self, out, return_dict: bool):
        n_video = math.prod(self.shapes["video"])
        video = out[:, :n_video].reshape(-1, *self.shapes["video"])
        audio = out[:, n_video:].reshape(-1, *self.shapes["audio"])
        if not return_dict:
            return video, audio
        from diffusers.models.transformers.transformer_ltx2 import AudioVisualModelOutput
        return AudioVisualModelOutput(sample=video, audio_sample=audio)


@contextmanager
def attach(pipe, *guidance, guidance_rescale: float = 0.0):
    """Apply PAG/SEG/SAG terms inside ``pipe`` (a diffusers pipeline with a ``unet`` or ``transformer``).

    ``guidance``: terms, or one list of them (``attach(pipe, pagkit.load_preset("preset.json"))``).

    CFG stays the pipeline's own (its ``guidance_scale``); passing ``pagkit.CFG`` here is an error. A term with
    ``fold=True`` (PAG, SEG, SLG, TPG, STG) perturbs the pipeline's unconditional rows (or its separate
    unconditional call) instead of adding rows, so the pipeline computes ε̂_u + w(ε_c − ε̂_u); a call that runs no
    CFG is refused.
    ``guidance_rescale`` is also the pipeline's own argument where it has one.
    A pipeline with a second expert (Wan 2.2's ``transformer_2``, the low-noise stage below its
    ``boundary_ratio``) has each expert guided, the terms bound to each model on its own, with that stage's CFG
    scale (``guidance_scale_2``); the pipeline switches between them as it does without pagkit.
    """
    if len(guidance) == 1 and isinstance(guidance[0], (list, tuple)):  # one list of terms (a preset)
        guidance = tuple(guidance[0])
    terms = check_guidance(guidance)
    if any(isinstance(t, CFG) and t.rule is not None for t in terms):
        raise ValueError("the pipeline applies CFG itself, so a rule on CFG (APG, CFGZeroStar) cannot act on it "
                         "here: use pagkit.sample(..., guidance=[CFG(w, rule=...)]) or diffusers' own guiders. "
                         "Rules on PAG, SEG, SLG or SAG work inside pagkit.attach.")
    if any(isinstance(t, CFG) for t in terms):
        raise ValueError("the pipeline applies CFG itself: set its guidance_scale and pass only PAG, SEG or SAG "
                         "to pagkit.attach")
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    model = getattr(pipe, name, None)
    if model is None:
        raise ValueError(f"{type(pipe).__name__} has no unet or transformer to guide")
    _check_guider(pipe)
    experts = [(model, lambda call_args, t: _pipeline_cfg_scale(pipe, call_args, t))]
    second = getattr(pipe, "transformer_2", None) if name == "transformer" else None
    if second is not None:  # Wan 2.2: the low-noise expert, with the pipeline's guidance_scale_2
        def second_scale(call_args, t):
            w = _pipeline_cfg_scale(pipe, call_args, t)
            w2 = getattr(pipe, "_guidance_scale_2", None)
            return w if w is None or w2 is None else float(w2)
        experts.append((second, second_scale))
    call_args: dict = {}
    wrapped = []
    try:
        for expert, cfg_scale in experts:
            wrapped.append(_wrap_denoiser(pipe, expert, terms, guidance_rescale, call_args, cfg_scale))
        folding = [t for t in terms if getattr(t, "fold", False)]

        def on_call():
            _check_call(pipe, call_args)
            _check_fold(pipe, call_args, folding)
            for w in wrapped:
                w.new_run()
        with _recording_call_arguments(pipe, call_args, on_call=on_call):
            yield pipe
    finally:
        for w in reversed(wrapped):
            w.restore()


class _Wrapped:
    """One denoiser of a pipeline with its forward (and ``cache_context``) replaced; ``restore`` undoes it."""

    def __init__(self, new_run, restore):
        self.new_run, self.restore = new_run, restore


def _unwrapped(module):
    """The module itself, or the one ``torch.compile(module)`` wraps (an ``OptimizedModule``)."""
    # by name: importing torch._dynamo for the class would slow every ``import pagkit``
    return module._orig_mod if type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod") else module


def _wrap_denoiser(pipe, outer, terms, guidance_rescale, call_args: dict, cfg_scale) -> _Wrapped:
    """Replace the forward of ``outer`` (the pipeline's denoiser) by the guided one (see ``attach``);
    ``cfg_scale(call_args, t)``: the CFG scale the pipeline applies to this model's predictions at scheduler
    timestep t, or None.

    Compiled models: a denoiser compiled in place (``model.compile()``) or wrapped (``torch.compile(model)``), left
    as it is, would have dynamo trace the guided forward too, whose per-step Python (the timestep as a float, the
    progress, the pipeline's arguments) breaks the graph and recompiles at every step. So the pipeline's call runs
    the guidance eagerly, and the guidance calls the compiled call of the model alone: dynamo sees the model only,
    as under pagkit.sample."""
    model = _unwrapped(outer)  # the model guided (its family, sites); ``outer`` is what the pipeline calls
    had_own_forward = "forward" in vars(outer)  # e.g. accelerate's offload hooks; an OptimizedModule's compiled call
    original_forward = outer.forward
    signature = inspect.signature(model.forward if outer is not model else original_forward)
    needs_scheduler = any(t.needs_scheduler for t in terms)
    streams = _AudioVideoStreams(pipe, model, terms) if _AudioVideoStreams.guides(model) else None
    compiled = getattr(outer, "_compiled_call_impl", None)  # model.compile(): torch.compile of the module's call

    def own_forward():
        if had_own_forward:
            outer.forward = original_forward
        else:
            vars(outer).pop("forward", None)

    def compiled_forward(*args, **kwargs):  # the compiled call, with the model's own forward in place
        own_forward()
        try:
            return compiled(*args, **kwargs)
        finally:
            outer.forward = guided_forward
    # an OptimizedModule's forward is already the compiled call of the model it wraps
    model_forward = original_forward if compiled is None else compiled_forward
    denoiser = GuidedDenoiser(model, terms, scheduler=pipe.scheduler if needs_scheduler else None,
                              guidance_rescale=guidance_rescale, external_cfg=True,
                              forward=model_forward if streams is None else streams.packed(model_forward))

    def guided_forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        inputs = dict(bound.arguments)
        inputs.update(inputs.pop("kwargs", {}) or {})
        return_dict = inputs.pop("return_dict", True)
        first = next(iter(signature.parameters))  # "sample" (UNets) or "hidden_states" (transformers)
        x, t = denoiser.backend.input_batch(model, inputs.pop(first)), inputs.pop(denoiser.backend.timestep_name)
        inputs = denoiser.backend.per_sample_inputs(model, x, inputs)
        scheduler_t = denoiser.backend.scheduler_timestep(t)
        progress = _progress(pipe, scheduler_t)
        if streams is not None:  # LTX-2: both streams, each divided by its own factor
            if context.get("name") in streams.plain_contexts:
                return model_forward(*args, **kwargs)
            divisors, batched = streams.divisors(x, inputs)
            w, w_separate = (divisors, None) if batched else (None, divisors)
        else:
            w = cfg_scale(call_args, scheduler_t)
            w_separate = _separate_cfg_scale(call_args) or _guider_cfg_scale(pipe)
        if w_separate is None and w is not None and context.get("name") in ("cond", "uncond"):
            w, w_separate = None, w  # CFG as two calls the pipeline names (WanPipeline), not a [∅; c] batch
        if w_separate is not None:
            # which call of the step this is: the pipeline's cache_context names it; without one, the
            # conditional call comes first at each timestep (FluxPipeline, QwenImagePipeline)
            t_now = _scalar(t)
            step["calls"] = step["calls"] + 1 if step.get("t") == t_now else 0
            step["t"] = t_now
            name = context.get("name") or ("uncond" if step["calls"] % 2 else "cond")
            name = {"pred_cond": "cond", "pred_uncond": "uncond"}.get(name, name)  # a guider's names
            if name == "uncond":
                with denoiser.folding(x, inputs, progress):  # fold=True terms: this call gives ε̂_u
                    result = model_forward(*args, **kwargs)
                if not denoiser.begin_step(progress):
                    return result
                # zero-init (CFG-Zero*): the pipeline's ε_u + w(ε_c' − ε_u) is 0 only if ε_u is 0 too
                zero = torch.zeros_like(result[0] if isinstance(result, tuple) else result.sample)
                return (zero,) if isinstance(result, tuple) else type(result)(sample=zero)
            out = denoiser.predict(x, t, inputs, None, progress, external_cfg=w_separate)
        elif w is not None and x.shape[0] % 2 == 0:
            half = x.shape[0] // 2
            shared = denoiser.backend.shared_inputs
            inputs_a, inputs_b = split_rows(inputs, x.shape[0], [half, half], shared)  # the CFG batch's halves
            t_a, t_b = split_rows(t, x.shape[0], [half, half])
            if cond_first:
                out = denoiser.predict(x[:half], t_a, inputs_a, inputs_b, progress, external_cfg=w)
                out = torch.cat(out.chunk(2)[::-1])  # predict returns [ε_u, ε_c']; this pipeline wants [ε_c', ε_u]
            else:
                out = denoiser.predict(x[half:], t_b, inputs_b, inputs_a, progress, external_cfg=w)
        else:
            folding = denoiser.folds(progress)
            if folding and not (_truncated_cfg(call_args, scheduler_t) or getattr(pipe, "guider", None) is not None):
                raise _fold_without_cfg(pipe, folding)  # a step that CFG's own schedule leaves out folds nothing
            out = denoiser.predict(x, t, inputs, None, progress)
        if streams is not None:
            return streams.output(out, return_dict)
        return denoiser.backend.model_output(model, denoiser.backend.caller_output(model, out), inputs, return_dict)

    cond_first = type(pipe).__name__ in _COND_FIRST
    step: dict = {}  # the last timestep and how many calls it has had (separate-call CFG)
    context: dict = {}  # the name of the pipeline's current cache_context ("cond", "uncond"), if it opens one
    had_own_context = "cache_context" in vars(outer)
    original_context = getattr(outer, "cache_context", None)

    @contextmanager
    def naming_cache_context(name, *args, **kwargs):
        context["name"] = name
        try:
            with original_context(name, *args, **kwargs):
                yield
        finally:
            context.pop("name", None)

    def new_run():  # each pipeline call is a sampling run: rules' state (APG momentum) starts afresh
        step.clear()
        denoiser.reset()

    outer.forward = guided_forward
    if compiled is not None:
        outer._compiled_call_impl = None  # the pipeline's call: eager, into guided_forward
    if original_context is not None:
        outer.cache_context = naming_cache_context

    def restore():
        own_forward()
        if compiled is not None:
            outer._compiled_call_impl = compiled
        if original_context is not None:
            if had_own_context:
                outer.cache_context = original_context
            else:
                del outer.cache_context
    return _Wrapped(new_run, restore)
