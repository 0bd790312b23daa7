"""Side-by-side cost of guidance: diffusers' PAG pipeline against pagkit (``sample`` and ``attach``), interleaved
rounds, medians. ``docs/bench_gpu.py`` runs the same harness at full size on an accelerator.

Every configuration samples the same number of steps from the same noise; the
rounds interleave the configurations, so drifts of the machine hit them all
alike. Ratios are of medians (÷ CFG and ÷ no guidance). Peak memory is the
largest rise of the process's resident memory during a run, sampled every 2 ms.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import guidance as G
from .sample import sample


def sd15_shaped_unet(seed: int = 0):
    """An SD1.5-shaped UNet2DConditionModel, (64, 128, 256, 256) channels, random weights."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32).eval()


def _on(model, device, dtype):
    """``model`` on ``device`` in ``dtype``; not cast when it already is (diffusers warns at every cast)."""
    p = next(model.parameters())
    return model if (p.device, p.dtype) == (torch.device(device), dtype) else model.to(device, dtype)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


class PeakMemory:
    """Largest rise of resident memory while the block runs (CPU); CUDA's own peak counter on a CUDA device."""

    def __init__(self, device="cpu"):
        self.cuda = _is_cuda(device)
        self.device = device

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.rise = self.peak - self.base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.rise = self.peak - self.base


@dataclass
class Result:
    name: str
    seconds: list[float]
    memory_rise: list[int]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def run_interleaved(configs: dict[str, Callable[[], object]], rounds: int, progress: bool = True,
                    device="cpu") -> dict[str, Result]:
    """On a CUDA ``device`` the clock stops only after the device has finished (kernels run asynchronously)."""
    results = {name: Result(name, [], []) for name in configs}
    sync = (lambda: torch.cuda.synchronize(device)) if _is_cuda(device) else (lambda: None)
    for name, fn in configs.items():  # warm-up, not timed
        fn()
    for r in range(rounds):
        for name, fn in configs.items():
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                fn()
                sync()
                seconds = time.perf_counter() - start
            results[name].seconds.append(seconds)
            results[name].memory_rise.append(mem.rise)
        if progress:
            print(f"  round {r + 1}/{rounds} done", flush=True)
    return results


def sd15_configs(steps: int, batch: int = 1, unet=None, side: int = 32, text: int = 77, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, Callable[[], object]]:
    """diffusers' PAG pipeline, ``pagkit.sample`` and ``pagkit.attach`` on a plain StableDiffusionPipeline, all
    on the same UNet, scheduler, embeddings (no text encoder) and side×side latents. Each configuration returns
    its output (the pipelines' ``.images`` are latents), so a test can compare them."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPAGPipeline, StableDiffusionPipeline
    from .pipelines import attach
    unet = _on(unet if unet is not None else sd15_shaped_unet(), device, dtype)
    # output_type="latent" never decodes: the VAE is only there because the pipelines require one
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae = _on(vae, device, dtype)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    common = dict(unet=unet, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    pipe = StableDiffusionPipeline(**common)
    pag_pipe = StableDiffusionPAGPipeline(**common, pag_applied_layers=["mid"])
    for p in (pipe, pag_pipe):
        p.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    dim = unet.config.cross_attention_dim
    emb, neg = (torch.randn(batch, text, dim, generator=g).to(device, dtype) for _ in range(2))
    latents = torch.randn(batch, unet.config.in_channels, side, side, generator=g).to(device, dtype)
    # height/width only pass the pipelines' checks (divisible by 8): the latents given fix the size
    call = dict(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps, output_type="latent",
                height=8 * side, width=8 * side, latents=latents)

    def ours(terms, share=True):
        def run():
            return sample(unet, scheduler, batch_size=batch, num_inference_steps=steps, guidance=terms,
                          latents=latents, encoder_hidden_states=emb, negative_encoder_hidden_states=neg,
                          progress_bar=False, prefix_sharing=share)
        return run

    def attached(w, *terms):
        def run():
            with attach(pipe, *terms):  # entering and leaving are part of what a user pays
                return pipe(**call, guidance_scale=w).images
        return run

    return {
        "no guidance (diffusers)": lambda: pipe(**call, guidance_scale=1.0).images,
        "CFG 7.5 (diffusers)": lambda: pipe(**call, guidance_scale=7.5).images,
        "CFG+PAG(mid) diffusers": lambda: pag_pipe(**call, guidance_scale=7.5, pag_scale=3.0).images,
        "PAG(mid) diffusers": lambda: pag_pipe(**call, guidance_scale=1.0, pag_scale=3.0).images,
        "no guidance pagkit": ours([]),
        "CFG 7.5 pagkit": ours([G.CFG(7.5)]),
        "CFG+PAG(mid) pagkit, no sharing": ours([G.CFG(7.5), G.PAG(3.0, layers="mid")], share=False),
        "CFG+PAG(mid) pagkit": ours([G.CFG(7.5), G.PAG(3.0, layers="mid")]),
        "PAG(mid) pagkit, no sharing": ours([G.PAG(3.0, layers="mid")], share=False),
        "PAG(mid) pagkit": ours([G.PAG(3.0, layers="mid")]),
        "PAG(mid) pagkit, first half only": ours([G.PAG(3.0, layers="mid", stop=0.5)]),
        # attach's own loop is diffusers' pipeline: with no terms it runs the pipeline's CFG batch through the
        # wrapper, so its ratio to "CFG 7.5 (diffusers)" is what the wrapper alone costs
        "CFG 7.5 pagkit.attach, no terms": attached(7.5),
        "CFG+PAG(mid) pagkit.attach": attached(7.5, G.PAG(3.0, layers="mid")),
        "PAG(mid) pagkit.attach": attached(1.0, G.PAG(3.0, layers="mid")),
    }


@torch.no_grad()
def prefix_share(unet, layers: str = "mid", rows: int = 2, side: int = 32, text: int = 77, repeats: int = 3) -> float:
    """The share of a forward of ``rows`` rows spent in the stages before ``layers`` (those prefix sharing runs on
    fewer rows: conv_in and the down blocks for ``mid``), timed with hooks around them; median of ``repeats``."""
    from .layers import resolve_layers
    from .prefix import prefix_stages
    stages = prefix_stages(unet, resolve_layers(unet, layers))
    if not stages:
        raise ValueError(f"{type(unet).__name__} has no stages before {layers!r} to share")
    spent, start = [0.0], {}
    handles = []
    for name in stages:
        module = unet.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: start.__setitem__(n, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, n=name: spent.__setitem__(0, spent[0] + time.perf_counter() - start[n])))
    p = next(unet.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, unet.config.in_channels, side, side, generator=g).to(p.device, p.dtype)
    emb = torch.randn(rows, text, unet.config.cross_attention_dim, generator=g).to(p.device, p.dtype)
    t = torch.tensor(500, device=p.device)
    shares = []
    try:
        unet(x, t, emb)  # warm-up
        for _ in range(repeats):
            spent[0] = 0.0
            begin = time.perf_counter()
            unet(x, t, emb)
            shares.append(spent[0] / (time.perf_counter() - begin))
    finally:
        for h in handles:
            h.remove()
    return statistics.median(shares)


SD15_TARGET = 1.36
"""Issue 19: CFG+PAG(mid) costs at most this many times CFG 7.5, through ``pagkit.sample`` and ``pagkit.attach``."""

# (what, CFG+PAG(mid) row, its CFG 7.5 row on the same loop, PAG(mid) row, its no-guidance row on the same loop)
_SAME_LOOP = (
    ("pagkit.attach (diffusers' StableDiffusionPipeline loop)", "CFG+PAG(mid) pagkit.attach", "CFG 7.5 (diffusers)",
     "PAG(mid) pagkit.attach", "no guidance (diffusers)"),
    ("pagkit.sample (its own loop)", "CFG+PAG(mid) pagkit", "CFG 7.5 pagkit", "PAG(mid) pagkit",
     "no guidance pagkit"),
    ("diffusers' StableDiffusionPAGPipeline", "CFG+PAG(mid) diffusers", "CFG 7.5 (diffusers)", "PAG(mid) diffusers",
     "no guidance (diffusers)"),
)


def sd15_reading(results: dict[str, Result], target: float = SD15_TARGET, share: float | None = None) -> str:
    """The sd15 table's ratios read on one sampling loop each, against the target.

    The table's ÷ columns divide every row by diffusers' pipeline; ``pagkit.sample`` runs its own loop, so its
    rows are read here against its own CFG and unguided rows, and attach's (which runs inside the pipeline)
    against the pipeline's. Rows missing from ``results`` are left out. ``share`` (``prefix_share``): the prefix's
    share of a forward; with it, the exact-result limit of prefix sharing in this run: the third row costs what
    the no-sharing row says it costs, on the stages after the prefix only."""
    def ratio(a, b):
        return results[a].median / results[b].median if a in results and b in results else None

    lines = [f"Target (issue 19): CFG+PAG(mid) ≤ {target:.2f}× CFG 7.5 on the same sampling loop "
             "(the ÷ columns above divide every row by diffusers' pipeline):"]
    for what, guided, cfg, pag, plain in _SAME_LOOP:
        r, p = ratio(guided, cfg), ratio(pag, plain)
        if r is None:
            continue
        verdict = "within" if r <= target else "over"
        pag_text = f"; PAG(mid) ÷ {plain} = {p:.2f}" if p is not None else ""
        lines.append(f"- {what}: {guided} ÷ {cfg} = {r:.2f} ({verdict}){pag_text}")
    wrapper = ratio("CFG 7.5 pagkit.attach, no terms", "CFG 7.5 (diffusers)")
    if wrapper is not None:
        lines.append("- attach's wrapper alone: CFG 7.5 pagkit.attach, no terms ÷ CFG 7.5 (diffusers) = "
                     f"{wrapper:.2f}")
    third = ratio("CFG+PAG(mid) pagkit, no sharing", "CFG 7.5 pagkit")
    if share is not None and third is not None:
        limit = 1 + (third - 1) * (1 - share)
        lines.append("- exact-result limit of prefix sharing: 1 + (CFG+PAG(mid) pagkit, no sharing ÷ CFG 7.5 "
                     f"pagkit − 1) × (1 − {share:.2f}) = {limit:.2f}, {share:.2f} the prefix's (conv_in, down "
                     "blocks) timed share of a forward")
    loops = ratio("CFG 7.5 pagkit", "CFG 7.5 (diffusers)")
    if loops is not None:
        lines.append(f"- the two loops: CFG 7.5 pagkit ÷ CFG 7.5 (diffusers) = {loops:.2f} (the same UNet batch)")
    return "\n".join(lines)


def _shipped_sampler(model, steps: int, batch: int) -> Callable[..., Callable[[], object]]:
    """``ours(terms, share=True)``: a run of ``steps`` DDIM steps of ``pagkit.sample`` on a shipped-style UNet from
    one fixed noise; on a class-conditional model with classes 0, 1, ... as eval cycles them, CFG's ∅ the null
    class."""
    from diffusers import DDIMScheduler

    from .defaults import NULL_CLASS
    scheduler = DDIMScheduler()
    size = model.config.sample_size
    latents = torch.randn(batch, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    conditional = bool(model.config.get("num_class_embeds"))
    labels = torch.arange(batch) % NULL_CLASS if conditional else None

    def ours(terms, share=True):
        return lambda: sample(model, scheduler, batch_size=batch, num_inference_steps=steps, guidance=terms,
                              latents=latents, class_labels=labels, null_class_label=NULL_CLASS if conditional
                              else None, progress_bar=False, prefix_sharing=share)
    return ours


def demo_configs(model, steps: int, batch: int = 1, layers: str = "mid", frontier: dict[str, list] | None = None
                 ) -> dict[str, Callable[[], None]]:
    """No guidance and PAG on ``layers`` with and without prefix sharing; with ``frontier`` (name → terms, e.g.
    ``frontier_terms()[0]``) also one row per frontier variant, interleaved with the others."""
    ours = _shipped_sampler(model, steps, batch)
    configs = {
        "no guidance": ours([]),
        f"PAG({layers}) pagkit, no sharing": ours([G.PAG(3.0, layers=layers)], share=False),
        f"PAG({layers}) pagkit": ours([G.PAG(3.0, layers=layers)]),
        f"PAG({layers}) pagkit, first half only": ours([G.PAG(3.0, layers=layers, stop=0.5)]),
    }
    for name, terms in (frontier or {}).items():
        configs.setdefault(name, ours(terms))  # the frontier's "no guidance" is the row above
    return configs


FLUX_SHAPE = dict(num_layers=4, num_single_layers=8, attention_head_dim=32, num_attention_heads=4, in_channels=16,
                  joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))


def flux_shaped_transformer(seed: int = 0, **overrides):
    """A Flux-shaped FluxTransformer2DModel (double- then single-stream blocks), small dimensions, random weights."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, **{**FLUX_SHAPE, **overrides}).eval()


def flux_configs(steps: int, side: int = 32, text: int = 64, model=None, depths=None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[dict[str, Callable[[], None]], dict]:
    """PAG on one block at depth d of n, with and without prefix sharing, against no guidance.

    Each configuration runs ``steps`` guided predictions on packed latents of side×side tokens and ``text``
    text tokens. Returns the configurations and, per PAG configuration, the exact-result limit (n − d)/n: the
    share of a forward that the perturbed row must recompute when the d blocks before it are shared.
    ``depths`` (default n/4, n/2, n − 1) picks the blocks; a model with ``guidance_embeds`` (Flux-dev) gets the
    distilled-guidance input 3.5.
    """
    from .denoise import GuidedDenoiser
    model = _on(model if model is not None else flux_shaped_transformer(), device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    x = torch.randn(1, side * side, model.config.in_channels, generator=g).to(device, dtype)
    cond = dict(encoder_hidden_states=torch.randn(1, text, model.config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g))
    cond = {k: v.to(device, dtype) for k, v in cond.items()}
    cond.update(img_ids=ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(text, 3, device=device))
    if model.config.guidance_embeds:
        cond["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
    blocks = [f"transformer_blocks.{i}.attn" for i in range(len(model.transformer_blocks))] + \
        [f"single_transformer_blocks.{i}.attn" for i in range(len(model.single_transformer_blocks))]
    n = len(blocks)

    def run(terms, share=True):
        denoiser = GuidedDenoiser(model, terms, prefix_sharing=share)

        @torch.no_grad()
        def go():
            for i in range(steps):
                denoiser.predict(x, torch.tensor([1.0 - i / steps], device=device, dtype=dtype), cond,
                                 progress=i / steps)
        return go

    configs, limits = {"no guidance": run([])}, {}
    for d in depths if depths is not None else (n // 4, n // 2, n - 1):
        name = f"PAG(block {d} of {n})"
        configs[f"{name} pagkit, no sharing"] = run([G.PAG(3.0, layers=blocks[d])], share=False)
        configs[f"{name} pagkit"] = run([G.PAG(3.0, layers=blocks[d])])
        limits[f"{name} pagkit"] = (n - d) / n
    return configs, limits


WAN_SHAPE = dict(num_layers=8, num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
                 text_dim=64, freq_dim=64, ffn_dim=512, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads",
                 cross_attn_norm=True, rope_max_seq_len=64)
WAN_LATENT = (5, 24, 24)  # latent frames × height × width: a 5 × 12 × 12 token grid (720 video tokens)


def wan_shaped_transformer(seed: int = 0, **overrides):
    """A Wan-shaped WanTransformer3DModel (3-D self-attention + text cross-attention per block), random weights."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**WAN_SHAPE, **overrides}).eval()


def wan_configs(steps: int, latent: tuple[int, int, int] = WAN_LATENT, text: int = 32, model=None
                ) -> tuple[dict[str, Callable[[], None]], dict]:
    """As ``flux_configs``, on a Wan-shaped video transformer: PAG on ``blocks.d.attn1`` (3-D self-attention over
    the F×H×W tokens) at depth d of n, with and without prefix sharing, against no guidance; latents (1, C, F, H, W)
    and ``text`` text tokens. The limit (n − d)/n: the share of a forward the perturbed row must recompute."""
    from .denoise import GuidedDenoiser
    model = model if model is not None else wan_shaped_transformer()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, model.config.in_channels, *latent, generator=g)
    cond = dict(encoder_hidden_states=torch.randn(1, text, model.config.text_dim, generator=g))
    n = len(model.blocks)

    def run(terms, share=True):
        denoiser = GuidedDenoiser(model, terms, prefix_sharing=share)

        @torch.no_grad()
        def go():
            for i in range(steps):
                denoiser.predict(x, torch.tensor([1000.0 * (1 - i / steps)]), cond, progress=i / steps)
        return go

    configs, limits = {"no guidance": run([])}, {}
    for d in sorted({n // 4, n // 2, n - 1}):
        name = f"PAG(block {d} of {n})"
        configs[f"{name} pagkit, no sharing"] = run([G.PAG(3.0, layers=f"blocks.{d}.attn1")], share=False)
        configs[f"{name} pagkit"] = run([G.PAG(3.0, layers=f"blocks.{d}.attn1")])
        limits[f"{name} pagkit"] = (n - d) / n
    return configs, limits


def report(title: str, results: dict[str, Result], baselines: list[str], limits: dict[str, float] | None = None,
           memory: str = "peak RSS rise MB") -> str:
    """A markdown table of medians and ratios; with ``limits``, also the extra cost over the first baseline
    (in forwards) beside its exact-result limit."""
    extra = ["extra ÷ forward", "limit (n − d)/n"] if limits else []
    lines = [f"### {title}", "", "| configuration | median s | " + " | ".join([f"÷ {b}" for b in baselines] + extra)
             + f" | {memory} |", "|---|---:|" + "---:|" * (len(baselines) + len(extra)) + "---:|"]
    for name, res in results.items():
        cells = [f"{res.median / results[b].median:.2f}" for b in baselines]
        if limits:
            cells += [f"{res.median / results[baselines[0]].median - 1:.2f}",
                      f"{limits[name]:.2f}" if name in limits else ""]
        lines.append(f"| {name} | {res.median:.3f} | {' | '.join(cells)} | {max(res.memory_rise) / 2**20:.0f} |")
    return "\n".join(lines)


# pagkit bench --model flux|wan: (what the header says, the table's title, the configurations)
DEPTH_BENCHES = {
    "flux": (f"Flux-shaped FluxTransformer2DModel {FLUX_SHAPE}, 32x32 packed latents, 64 text tokens",
             "Flux-shaped transformer, PAG on one block at depth d of n", flux_configs),
    "wan": (f"Wan-shaped WanTransformer3DModel {WAN_SHAPE}, latents {'x'.join(map(str, WAN_LATENT))} (F x H x W), "
            "32 text tokens", "Wan-shaped video transformer, PAG on one block at depth d of n", wan_configs),
}


# --- the quality-against-cost frontier (issue 19, item 2; docs/results.md table 12) ------------------------------
FRONTIER_INTERVALS = ((0.33, 0.67), (0.0, 0.5))  # the middle third and the first half (0 = pure noise)
FRONTIER_CACHES = (2, 3, 4)  # cache=k: the perturbed rows on 1 active step in k


def frontier_name(terms) -> str:
    """A frontier variant's name, shared by the bench rows and docs/make_results.py's table 12 (which names its
    eval rows with it to find their cost): ``"PAG t=0.33–0.67"``, ``"SEG cache=2"``, ``"CFG 1.5 + PAG folded"``.
    Layers and scales are not in it: the bench JSON keeps each row's full spec beside its name."""
    if not terms:
        return "no guidance"
    parts = []
    for term in terms:
        if isinstance(term, G.CFG):
            parts.append(f"CFG {term.scale:g}")
            continue
        words = [type(term).__name__]
        if (term.start, term.stop) != (0.0, 1.0):
            words.append(f"t={term.start:g}–{term.stop:g}")
        if getattr(term, "cache", 1) != 1:
            words.append(f"cache={term.cache}")
        if getattr(term, "fold", False):
            words.append("folded")
        parts.append(" ".join(words))
    return " + ".join(parts)


def frontier_terms(pag=None, seg=None, cfg: float | None = None) -> tuple[dict[str, list], dict[str, list]]:
    """The frontier's variants by ``frontier_name``: on the unconditional model (no guidance; PAG and SEG on the
    full trajectory, on each of ``FRONTIER_INTERVALS`` and with each of ``FRONTIER_CACHES``), and on the
    conditional one (CFG w, CFG w + PAG, CFG w + PAG folded). ``pag``/``seg`` are (layers, scale), default the
    shipped settings (pagkit.defaults: table 9a's), ``cfg`` CFG's w (default 1.5)."""
    from .defaults import (DEFAULT_CFG_SCALE, DEFAULT_PAG_LAYERS, DEFAULT_PAG_SCALE, DEFAULT_SEG_LAYERS,
                           DEFAULT_SEG_SCALE)
    pag = pag or (DEFAULT_PAG_LAYERS, DEFAULT_PAG_SCALE)
    seg = seg or (DEFAULT_SEG_LAYERS, DEFAULT_SEG_SCALE)
    w = DEFAULT_CFG_SCALE if cfg is None else cfg
    # SEG's σ = ∞ and PAG's identity perturbation written out, as eval's rows write them
    made = {"PAG": lambda **kw: G.PAG(float(pag[1]), layers=list(pag[0]), perturbation="identity", **kw),
            "SEG": lambda **kw: G.SEG(float(seg[1]), layers=list(seg[0]), sigma=float("inf"), **kw)}
    uncond = [[]]
    for make in made.values():
        uncond += [[make()], *([make(start=a, stop=b)] for a, b in FRONTIER_INTERVALS),
                   *([make(cache=k)] for k in FRONTIER_CACHES)]
    cond = [[G.CFG(w)], [G.CFG(w), made["PAG"]()], [G.CFG(w), made["PAG"](fold=True)]]
    return ({frontier_name(t): t for t in uncond}, {frontier_name(t): t for t in cond})


def frontier_cond_configs(model, steps: int, batch: int = 1, terms: dict[str, list] | None = None
                          ) -> dict[str, Callable[[], object]]:
    """The conditional frontier rows (``frontier_terms()[1]``) on a class-conditional model: classes 0, 1, ... as
    eval cycles them, CFG's ∅ the null class; each runs ``steps`` DDIM steps from the same noise."""
    ours = _shipped_sampler(model, steps, batch)
    return {name: ours(t) for name, t in (terms if terms is not None else frontier_terms()[1]).items()}


def machine_load() -> dict:
    """The 1-, 5- and 15-minute load averages and the CPU count: how busy the machine was around a bench."""
    import os
    one, five, fifteen = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2),
            "cpus": os.cpu_count()}


def json_section(title: str, model: str, results: dict[str, Result], baseline: str,
                 specs: dict[str, str] | None = None) -> dict:
    """One bench table, machine-readable: per configuration its median seconds, the ratio of medians to
    ``baseline``, every round's seconds and (frontier rows) its guidance spec (pagkit.spec.format_spec)."""
    base = results[baseline].median
    rows = {}
    for name, res in results.items():
        rows[name] = {"median_s": res.median, "ratio": res.median / base, "seconds": list(res.seconds),
                      "peak_rss_rise_mb": max(res.memory_rise) / 2**20}
        if specs and name in specs:
            rows[name]["guidance"] = specs[name]
    return {"title": title, "model": model, "baseline": baseline, "rows": rows}


def pareto_front(costs: list[float], values: list[tuple[float, ...]]) -> list[bool]:
    """Which points are on the Pareto front when cost and every value are to be minimised: point i is on it
    unless some j is no worse in all (cost and each value) and better in one. Points that tie exactly all stay."""
    if len(costs) != len(values):
        raise ValueError(f"{len(costs)} costs for {len(values)} points")
    on = []
    for i, (ci, vi) in enumerate(zip(costs, values)):
        dominated = any(cj <= ci and all(a <= b for a, b in zip(vj, vi)) and (cj < ci or any(a < b for a, b in
                                                                                          zip(vj, vi)))
                        for j, (cj, vj) in enumerate(zip(costs, values)) if j != i)
        on.append(not dominated)
    return on
