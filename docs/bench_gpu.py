"""pagkit against diffusers on an accelerator, side by side in one run: random-weight models at full size.

On a GPU machine, from the repository root (torch with CUDA, diffusers, pagkit installed or on PYTHONPATH=src):

    python docs/bench_gpu.py --device cuda --out docs/bench_gpu.md

It needs roughly 30 GB of GPU memory (the Flux-sized transformer's ~12B bfloat16 weights, built on the device in
that dtype, plus activations); `--model sd15` alone needs a few GB. As a smoke test on CPU, tiny configurations,
a few seconds (tests/test_cost.py runs exactly this, so the script cannot rot):

    python docs/bench_gpu.py --small --steps 1 --rounds 1 --device cpu --out /tmp/bench_gpu.md

What it measures (each configuration samples the same steps from the same noise; rounds interleave the
configurations; times are medians; pagkit.bench's harness, the one `pagkit bench` uses):

- SD1.5: the real SD1.5 UNet config (block_out_channels (320, 640, 1280, 1280), cross_attention_dim 768,
  attention_head_dim 8, layers_per_block 2, sample_size 64), random weights, 64×64 latents (512² images),
  float16 on CUDA, 77×768 prompt embeddings (no text encoder), DDIM. Rows: "... (diffusers)" are
  StableDiffusionPipeline (no guidance, CFG 7.5) and StableDiffusionPAGPipeline (PAG 3.0 on the mid block, with
  and without CFG); "... pagkit" is pagkit.sample on the same UNet; "... pagkit.attach" is pagkit.attach on the
  plain StableDiffusionPipeline. "÷ CFG 7.5 (diffusers)" is the cost of CFG+PAG over CFG; "÷ no guidance" that
  of PAG alone over one forward per step.
- Flux: a FluxTransformer2DModel in Flux-dev's shape (19 double + 38 single blocks, 24 heads × 128,
  joint_attention_dim 4096, pooled 768, guidance_embeds), random weights, 4096 image tokens (1024² images)
  and 512 text tokens, bfloat16 on CUDA. diffusers has no PAG for Flux, so the rows are pagkit's PAG 3.0 on
  one double block against no guidance, with and without prefix sharing (the blocks before the perturbed one
  run once for both rows); "limit (n − d)/n" is the share of a forward the perturbed row must recompute.
- Memory: on CUDA the peak of torch.cuda.max_memory_allocated during a configuration minus what was
  allocated before it (weights and inputs); on CPU the peak rise of resident memory (pagkit.bench.PeakMemory).

The results go to --out (default docs/bench_gpu.md), written atomically, headed by the hardware, the torch and
diffusers versions and the dtypes. Bad input (--device cuda without CUDA, an --out that is a folder) is one
error line and exit status 2.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from contextlib import contextmanager

import torch

from pagkit import bench
from pagkit.io import atomic_path, check_output_file

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
SD15_SMALL = dict(SD15, sample_size=8, layers_per_block=1, block_out_channels=(32, 32, 64, 64), norm_num_groups=8)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_SMALL = dict(bench.FLUX_SHAPE, patch_size=1, num_layers=2, num_single_layers=2, guidance_embeds=True)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BadInput(Exception):
    pass


def parse(argv):
    p = argparse.ArgumentParser(description="pagkit vs diffusers on an accelerator (see the module docstring)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=["sd15", "flux", "both"], default="both")
    p.add_argument("--small", action="store_true", help="tiny configurations (CPU smoke test)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: float16 for SD1.5 and bfloat16 for Flux on CUDA, float32 on CPU")
    p.add_argument("--out", default="docs/bench_gpu.md")
    return p.parse_args(argv)


def check(args) -> torch.device:
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name} must be a positive integer, got {getattr(args, name)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise BadInput(f"--device {args.device}: not a torch device (e.g. cuda, cuda:1, cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}, "
                           f"CUDA build {torch.version.cuda}); run with --device cpu --small")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInput(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise BadInput(f"--device {args.device}: only cuda and cpu are supported")
    try:
        check_output_file(args.out)
    except (OSError, ValueError) as err:
        raise BadInput(str(err)) from None
    return device


def dtype_for(args, device, cuda_default):
    if args.dtype != "auto":
        return DTYPES[args.dtype]
    return cuda_default if device.type == "cuda" else torch.float32  # half-precision kernels on CPU: slow or absent


@contextmanager
def built_on(device, dtype):
    """Build the weights on the device, in their dtype: a Flux-sized model initialised on CPU in float32 takes
    minutes and 48 GB."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def hardware(device) -> str:
    import diffusers
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    return f"{where}; torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}"


def weights_mb(device) -> str:
    return f", {torch.cuda.memory_allocated(device) / 2**20:.0f} MB allocated before the runs" \
        if device.type == "cuda" else ""


def run_sd15(args, device, memory):
    from diffusers import UNet2DConditionModel
    dtype = dtype_for(args, device, torch.float16)
    config = SD15_SMALL if args.small else SD15
    with built_on(device, dtype):
        unet = UNet2DConditionModel(**config).eval()
    side = config["sample_size"]
    configs = bench.sd15_configs(args.steps, unet=unet, side=side, device=device, dtype=dtype)
    head = (f"SD1.5-{'shaped (small)' if args.small else 'sized'} UNet2DConditionModel "
            f"{config['block_out_channels']}, {side}×{side} latents ({8 * side}² images), {dtype}, "
            f"{args.steps} DDIM steps, {args.rounds} rounds{weights_mb(device)}")
    print(head, flush=True)
    results = bench.run_interleaved(configs, args.rounds, device=device)
    return head, bench.report("SD1.5: diffusers vs pagkit.sample vs pagkit.attach", results,
                              ["CFG 7.5 (diffusers)", "no guidance (diffusers)"], memory=memory) + \
        "\n\n" + bench.sd15_reading(results)


def run_flux(args, device, memory):
    from diffusers import FluxTransformer2DModel
    dtype = dtype_for(args, device, torch.bfloat16)
    config = FLUX_SMALL if args.small else FLUX_DEV
    side, text = (4, 8) if args.small else (64, 512)  # 64×64 packed tokens: a 1024² image's 128×128 latents
    with built_on(device, dtype):
        model = FluxTransformer2DModel(**config).eval()
    depth = config["num_layers"] // 2  # a middle double block
    configs, limits = bench.flux_configs(args.steps, side=side, text=text, model=model, depths=(depth,),
                                         device=device, dtype=dtype)
    head = (f"Flux-{'shaped (small)' if args.small else 'dev-sized'} FluxTransformer2DModel "
            f"({config['num_layers']} double + {config['num_single_layers']} single blocks, "
            f"{config['num_attention_heads']}×{config['attention_head_dim']}), {side * side} image + {text} text "
            f"tokens, {dtype}, {args.steps} predictions, {args.rounds} rounds{weights_mb(device)}")
    print(head, flush=True)
    results = bench.run_interleaved(configs, args.rounds, device=device)
    return head, bench.report("Flux: pagkit's PAG on one double block vs no guidance", results, ["no guidance"],
                              limits, memory=memory)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        device = check(args)
    except BadInput as err:
        print(f"bench_gpu: error: {err}", file=sys.stderr)
        return 2
    memory = "peak CUDA MB above before" if device.type == "cuda" else "peak RSS rise MB"
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sections = []
    with torch.no_grad():
        if args.model in ("sd15", "both"):
            sections.append(run_sd15(args, device, memory))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.model in ("flux", "both"):
            sections.append(run_flux(args, device, memory))
    command = "python docs/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# `{command}`, {started}", "", f"Hardware: {hardware(device)}.", ""]
    for head, table in sections:
        lines += [head + ".", "", table, ""]
    text = "\n".join(lines)
    print(text)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
