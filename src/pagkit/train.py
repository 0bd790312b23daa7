"""Train the small Fashion-MNIST UNet2DModels that pagkit ships.

One loop: sample a batch, a timestep and noise, regress ε (epsilon prediction),
AdamW step, EMA update. Every ``checkpoint_every`` steps the full state
(weights, EMA, optimizer, step) is written atomically as safetensors + JSON, so a
killed run resumes where it stopped. Batches, timesteps and noise are drawn from
generators seeded by (seed, step): a resumed run sees exactly the data an
uninterrupted one would.

The final EMA weights are written as a diffusers pipeline folder
(``model_index.json``, ``unet/``, ``scheduler/``), loadable with
``UNet2DModel.from_pretrained(dir, subfolder="unet")`` and with diffusers'
own ``DDPMPipeline`` / ``DDIMPipeline``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import io
from .data import IMAGE_SIZE, data_checksum, default_data_dir, load_fashion_mnist
from .defaults import NULL_CLASS, NUM_CLASSES



def unet_config(conditional: bool, size: str = "small") -> dict:
    """The shipped architecture: self-attention at 16×16 and 8×8, as in ADM's lower resolutions.

    ``small`` (1.16M parameters) trains at about 64 images/s on one CPU thread.
    ``tiny`` is for tests.
    """
    channels = {"small": (32, 64, 64), "tiny": (16, 32, 32)}[size]
    config = dict(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1,
        block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=channels[-1] // 2, norm_num_groups=channels[0] // 2,
    )
    if conditional:
        config["num_class_embeds"] = NUM_CLASSES + 1  # +1: the null class
    return config


@dataclass
class TrainConfig:
    out: str
    conditional: bool = False
    size: str = "small"
    max_steps: int = 6000
    time_budget_min: float | None = None  # stop (after a checkpoint) once this many minutes have run
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    label_dropout: float = 0.15  # conditional only: fraction of labels replaced by the null class
    hflip: bool = True
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 250
    milestones: tuple[float, ...] = (0.25, 0.5, 1.0)  # EMA snapshots kept at these fractions of max_steps
    data_dir: str | None = None
    extra: dict = field(default_factory=dict)
    stop_at_step: int | None = None
    """Stop after this step (with a checkpoint), leaving the learning-rate schedule and the milestones on
    ``max_steps``: the steps run are those of the full run, and running again without it resumes to the end.
    ``max_steps=6000, stop_at_step=1500`` gives the shipped ``fmnist`` run's ``ema-25pct`` snapshot (its first
    2000 steps ran with ``--max-steps 6000``), the weak model ``fmnist-weak`` for autoguidance."""

    def __post_init__(self):
        if self.size not in ("small", "tiny"):
            raise ValueError(f"size must be one of small, tiny, got {self.size!r}")
        for name in ("max_steps", "batch_size", "checkpoint_every", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, low, high in (("lr", 0, math.inf), ("ema_decay", 0, 1), ("label_dropout", 0, 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                    or not math.isfinite(value) or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite number in {'(0, inf)' if name == 'lr' else '[0, 1]'}, "
                                 f"got {value!r}")
        if self.time_budget_min is not None and not (isinstance(self.time_budget_min, (int, float))
                                                     and 0 <= self.time_budget_min < math.inf):
            raise ValueError(f"time_budget_min must be None or a finite number >= 0, got {self.time_budget_min!r}")
        if self.stop_at_step is not None and not (isinstance(self.stop_at_step, int)
                                                  and 1 <= self.stop_at_step <= self.max_steps):
            raise ValueError(f"stop_at_step must be an integer in [1, max_steps={self.max_steps}], "
                             f"got {self.stop_at_step!r}")


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batch(step: int, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig):
    n = images.shape[0]
    per_epoch = n // cfg.batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    idx = perm[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 1)
    x0, y = images[idx], labels[idx].clone()
    if cfg.hflip:
        flip = torch.rand(len(idx), generator=g) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    if cfg.conditional:
        drop = torch.rand(len(idx), generator=g) < cfg.label_dropout
        y[drop] = NULL_CLASS
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (len(idx),), generator=g)
    return x0, y, noise, t


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, out: Path, snapshot: dict | None = None) -> None:
    """Write a diffusers pipeline folder atomically (to a temporary folder, then renamed), with
    ``snapshot.json`` when ``snapshot`` is given."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
        if snapshot is not None:
            io.write_json(tmp / "snapshot.json", snapshot)
    except BaseException:  # a full disk: no half-written pipeline stays behind
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) into ``cfg.out``; returns the folder of the final EMA pipeline.

    One run at a time per ``cfg.out`` (``io.run_lock``: a second is refused with ``io.RunLocked``)."""
    with io.run_lock(cfg.out):
        return _train(cfg)


def _checkpoint_files(step: int) -> dict[str, str]:
    """The tensor files of the checkpoint at ``step``: named by their step, so that writing the next one never
    touches the files ``state.json`` names (a kill while writing leaves the last checkpoint whole)."""
    return {part: f"{part}-{step:07d}.safetensors" for part in ("model", "ema", "optimizer")}


def _train(cfg: TrainConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    data_dir = cfg.data_dir or str(default_data_dir())
    images, labels = load_fashion_mnist("train", data_dir)
    if len(images) < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(images)} images)")

    torch.manual_seed(cfg.seed)
    unet = UNet2DModel(**unet_config(cfg.conditional, cfg.size))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4,
                   model_cls=UNet2DModel, model_config=unet.config)
    step, log, seconds_before, running = 0, [], 0.0, None

    if (ckpt / "state.json").is_file():  # resume
        state = io.read_json(ckpt / "state.json")
        if state["config"]["conditional"] != cfg.conditional or state["config"]["size"] != cfg.size:
            raise ValueError(f"{ckpt} holds a different model (conditional={state['config']['conditional']}, "
                             f"size={state['config']['size']}); use another --out")
        files = state.get("files", {part: f"{part}.safetensors" for part in ("model", "ema", "optimizer")})
        unet.load_state_dict(io.load_tensors(ckpt / files["model"]))
        ema_tensors = io.load_tensors(ckpt / files["ema"])
        ema.shadow_params = [ema_tensors[f"{i}"] for i in range(len(ema.shadow_params))]
        ema.optimization_step = state["ema_optimization_step"]
        io.optimizer_from_tensors(opt, io.load_tensors(ckpt / files["optimizer"]), state["optimizer"])
        step, log, seconds_before = state["step"], state["log"], state["seconds"]
        running = state["running_loss"]
        print(f"resuming from {ckpt} at step {step}")

    def write_checkpoint():
        opt_tensors, opt_meta = io.optimizer_to_tensors(opt)
        files = _checkpoint_files(step)
        io.save_tensors(ckpt / files["model"], unet.state_dict())
        io.save_tensors(ckpt / files["ema"], {f"{i}": p for i, p in enumerate(ema.shadow_params)})
        io.save_tensors(ckpt / files["optimizer"], opt_tensors)
        # state.json last, in one rename: it names a step whose tensors are all on disk
        io.write_json(ckpt / "state.json", {
            "step": step, "seconds": seconds_before + time.time() - t_start, "log": log, "running_loss": running,
            "ema_optimization_step": ema.optimization_step, "optimizer": opt_meta, "config": asdict(cfg),
            "files": files})
        for old in ckpt.glob("*.safetensors"):  # earlier checkpoints (and one a kill left unnamed)
            if old.name not in files.values():
                old.unlink(missing_ok=True)

    def write_ema_pipeline(folder: Path, snapshot: dict | None = None):
        ema_unet = UNet2DModel(**unet_config(cfg.conditional, cfg.size))
        ema.copy_to(ema_unet.parameters())
        save_pipeline(ema_unet, scheduler, folder, snapshot)  # snapshot: what export_model(snapshot=...) cards

    alphas_cumprod = scheduler.alphas_cumprod
    t_start = time.time()
    milestone_steps = {round(f * cfg.max_steps): f for f in cfg.milestones}
    end = cfg.max_steps if cfg.stop_at_step is None else cfg.stop_at_step
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    unet.train()
    while step < end:
        x0, y, noise, t = _batch(step, images, labels, cfg)
        a = alphas_cumprod[t].sqrt()[:, None, None, None]
        s = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
        x_t = a * x0 + s * noise
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        pred = unet(x_t, t, class_labels=y if cfg.conditional else None).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        step += 1
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 50 == 0:
            log.append({"step": step, "loss": round(running, 5),
                        "seconds": round(seconds_before + time.time() - t_start, 1)})
        out_of_time = (cfg.time_budget_min is not None
                       and seconds_before + time.time() - t_start > 60 * cfg.time_budget_min)
        if step in milestone_steps:  # before the checkpoint: a run resumed after this step has its snapshot
            seconds = round(seconds_before + time.time() - t_start, 1)
            write_ema_pipeline(out / f"ema-{int(round(100 * milestone_steps[step]))}pct",
                               {"step": step, "fraction": milestone_steps[step], "max_steps": cfg.max_steps,
                                "seconds": seconds, "loss": round(running, 5)})
        if step % cfg.checkpoint_every == 0 or step == end or out_of_time:
            write_checkpoint()
        if out_of_time:
            print(f"time budget of {cfg.time_budget_min} min reached at step {step}; run again to resume")
            break
    bar.close()
    if step < cfg.max_steps and step == end:
        print(f"stopped at step {step} of {cfg.max_steps} (stop_at_step); run again without it to resume")
    final = out / "final"
    write_ema_pipeline(final)
    summary = {
        "steps": step, "images_seen": step * cfg.batch_size,
        "seconds": round(seconds_before + time.time() - t_start, 1),
        "final_loss_ema100": log[-1]["loss"] if log else None,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "data_md5": data_checksum(data_dir), "config": asdict(cfg),
        "finished": step >= cfg.max_steps,
    }
    io.write_json(out / "summary.json", summary)
    return final


def export_model(run_dir: str | Path, dest: str | Path, *, command: str, notes: str = "",
                 snapshot: str | None = None) -> Path:
    """Copy a finished run's EMA pipeline to ``dest`` with a model card (``README.md`` + ``card.json``).

    ``notes``: anything about the run the numbers do not say (e.g. a budget changed on resume).
    ``snapshot``: export the run's EMA snapshot of that name instead (``"ema-25pct"``: the weak model for
    autoguidance); the run need not have finished, and the card gives the snapshot's step, loss and time.
    """
    import json
    import shutil
    run_dir, dest = Path(run_dir), Path(dest)
    summary = io.read_json(run_dir / "summary.json")
    source = run_dir / "final"
    if snapshot is not None:
        source = run_dir / snapshot
        if not (source / "snapshot.json").is_file():
            found = sorted(p.name for p in run_dir.glob("ema-*pct") if (p / "snapshot.json").is_file())
            raise ValueError(f"{run_dir} has no EMA snapshot {snapshot!r} (snapshots: {', '.join(found) or 'none'})")
        taken = io.read_json(source / "snapshot.json")
        summary = {**summary, "steps": taken["step"], "images_seen": taken["step"] * summary["config"]["batch_size"],
                   "seconds": taken["seconds"], "final_loss_ema100": taken["loss"]}
    elif not summary.get("finished"):
        raise ValueError(f"{run_dir} has not finished training ({summary['steps']} steps); resume it first")
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    (tmp / "snapshot.json").unlink(missing_ok=True)
    unet_config = json.loads((tmp / "unet" / "config.json").read_text())
    cfg = summary["config"]
    card = {
        "name": dest.name, "training_command": command, "training_seconds": summary["seconds"],
        "steps": summary["steps"], "batch_size": cfg["batch_size"], "images_seen": summary["images_seen"],
        "final_loss": summary["final_loss_ema100"], "parameters": summary["parameters"],
        "data": "Fashion-MNIST train split (60,000 images, padded 28->32, [-1, 1], random h-flips)",
        "data_md5": summary["data_md5"], "ema_decay": cfg["ema_decay"], "lr": cfg["lr"],
        "conditional": cfg["conditional"], "label_dropout": cfg["label_dropout"] if cfg["conditional"] else None,
        "null_class": NULL_CLASS if cfg["conditional"] else None, "threads": cfg["threads"],
        "unet_config": {k: v for k, v in unet_config.items() if not k.startswith("_")}, "notes": notes,
    }
    if snapshot is not None:  # which EMA snapshot of which budget: steps alone do not say (the lr schedule does)
        card["snapshot"] = {"name": snapshot, **{k: taken[k] for k in ("step", "fraction", "max_steps")}}
    io.write_json(tmp / "card.json", card)
    kind = (f"class-conditional ({NUM_CLASSES} classes + null class {NULL_CLASS} for CFG, "
            f"label dropout {cfg['label_dropout']:.0%})" if cfg["conditional"] else "unconditional")
    (tmp / "README.md").write_text(f"""# {dest.name}: a {kind} Fashion-MNIST diffusion model

A diffusers `UNet2DModel` ({summary['parameters'] / 1e6:.2f}M parameters, 32×32×1, epsilon prediction,
DDPM linear β schedule, 1000 steps) with self-attention at 16×16 and 8×8, trained by pagkit on one CPU thread.
These are the EMA weights (decay {cfg['ema_decay']}), in safetensors.

| | |
|---|---|
| training command | `{command}` |
| training time | {summary['seconds'] / 60:.1f} min |
| steps × batch | {summary['steps']} × {cfg['batch_size']} = {summary['images_seen']:,} images seen |
| final loss (running mean) | {summary['final_loss_ema100']} |
| data | Fashion-MNIST train, md5 of the uncompressed idx images+labels `{summary['data_md5']}` |

Load it with `pagkit.load.load_model("{dest.name}")`, `UNet2DModel.from_pretrained(<this folder>, subfolder="unet")`
or `DDIMPipeline.from_pretrained(<this folder>)`. Machine-readable: `card.json`.
""" + (f"\n{notes}\n" if notes else ""))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
