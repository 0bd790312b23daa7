"""Run the evaluation sweeps behind docs/results.md and rebuild it (and docs/results.json) from their results.

    python docs/make_results.py --run            # run every table's commands (resumable), then rebuild
    python docs/make_results.py --run --tables 2,3   # only these tables (e.g. one process per core)
    python docs/make_results.py                  # rebuild the documents from whatever has finished
    python docs/make_results.py --score          # score configurations whose shards are all made (no sampling)

Results survive sessions in ``docs/evidence/<sweep folder name>/<config key>.json`` (with the folder's
``feature_space.json``): every build copies each finished ``results/*.json`` of the tables' sweep folders
(runs/eval/map, runs/eval/report) there, rows are read from the sweep folder if there, else from the evidence,
and ``--run`` first seeds each sweep folder's results/ from the evidence, so ``pagkit eval`` skips them.

Each table is a list of ``pagkit eval`` command lines. The document shows them
verbatim and reads each table's rows back through the same argument parser and
``expand``, so a table cannot drift from the command that made it. Rows that
have not been computed yet are listed as missing, never invented.

Selection protocol (issue 5): every "best" choice (layer, scale) was made on
seed set 0 (tables 2-4, 6-7); table 1 reports the chosen configurations on
seed sets 1 and 2.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's pagkit (also when imported by map_shards.py)

from pagkit.defaults import DEFAULT_RESTORE_PAG_LAYERS, DEFAULT_RESTORE_PAG_SCALE, DEFAULT_SAG_SCALE  # noqa: E402

EVIDENCE = ROOT / "docs" / "evidence"
MAP = "runs/eval/map"  # seed set 0: selection
REPORT = "runs/eval/report"  # seed sets 1, 2: reporting

# The first map's choices, on seed set 0 (tables 2-3 and 7; see the notes under each table). Tables 1-8 were made
# with them, so they are written here and not read from pagkit.defaults: re-choosing the shipped defaults (table
# 9a) must not change those tables' commands and orphan their rows.
BEST_LAYERS = "down.2"
BEST_SCALE = "0.5"
SEG_LAYERS = "mid"
SEG_SCALE = "1"
SAG_SCALE = f"{DEFAULT_SAG_SCALE:g}"  # diffusers' default; no SAG scale helped on the map (table 7)
ALL_LAYERS = "down.1;down.2;mid;up.0.attentions.0;up.0.attentions.1;up.1.attentions.0;up.1.attentions.1"
THIRDS = "0:0.34,0.33:0.67,0.66:1"
INTERVALS = f"{THIRDS},0:0.5,0.5:1"  # table 10: thirds and halves

COMMON = "--num-samples 500 --seed-sets 0 --steps 20 --quiet"
# Table 9's choices by its rule (section 9a; (layers, scale)): reported in table 1 on fresh seeds, and PAG's
# repeated under trailing spacing (issue 22, item 6). The document says so when the rule's choice on the
# finished rows differs from these (then the rows made with them must be remade).
MAP9_PAG = ("up.0.attentions.1", "0.5")
MAP9_SEG = ("up.1.attentions.0", "1")
# pagkit tune's choices (2,350 samples each; README "The shipped presets"), shipped as fmnist:pag / fmnist:seg
# (src/pagkit/models/fmnist/presets): table 1 reports them beside the map's. tests/test_shipped_models.py checks
# that the shipped presets still hold these.
TUNED_PAG = ("mid", "0.5")
TUNED_SEG = ("up.1.attentions.0", "1")  # = MAP9_SEG: the tune chose the map's SEG, whose rows table 1 has
TABLE1_METHODS = (f"--methods none,pag --scales {BEST_SCALE} --layers {BEST_LAYERS}",
                  f"--methods seg --scales {SEG_SCALE} --layers {SEG_LAYERS} --seg-sigmas inf,2",
                  f"--methods sag --scales {SAG_SCALE} --sag-layers mid",
                  # SAG's best row on the map (table 7: the early third), chosen after the line above was fixed
                  f"--methods sag --scales {SAG_SCALE} --sag-layers mid --intervals {THIRDS.split(',')[0]}",
                  # table 9's choices (section 9a), re-chosen on the completed map
                  f"--methods pag --scales {MAP9_PAG[1]} --layers {MAP9_PAG[0]}",
                  f"--methods seg --scales {MAP9_SEG[1]} --layers {MAP9_SEG[0]} --seg-sigmas inf",
                  # pagkit tune's choices, the shipped presets (issue 18): the tune against the map
                  f"--methods pag --scales {TUNED_PAG[1]} --layers {TUNED_PAG[0]}")
TABLES = [
    dict(title="1. Unconditional `fmnist`: the chosen configurations on fresh seeds",
         note="Mean ± spread (half the range) over seed sets 1 and 2, DDIM-20: first 500 samples per seed set, "
              "then the issue's 10,000 (one command per seed set, so two cores can share the work).",
         commands=[f"pagkit eval --model fmnist {methods} --num-samples {n} --seed-sets {seeds} --quiet --out {REPORT}"
                   for n, seed_sets in ((500, ("1,2",)), (10000, (1, 2)))
                   for methods in TABLE1_METHODS for seeds in seed_sets],
         aggregate=True),
    dict(title="2. PAG scale sweeps on the best layers",
         note="Scale 0 is the unguided row.",
         commands=[f"pagkit eval --model fmnist --methods none,pag --scales 0.25,0.5,1,2,3,4,5 "
                   f"--layers 'down.1;down.2' {COMMON} --out {MAP}"]),
    dict(title="3. Layer ablation: each self-attention layer alone, and groups (PAG s=3)",
         note="`down` = both encoder layers; `down.2,mid,up.0` = every 8×8 layer.",
         commands=[f"pagkit eval --model fmnist --methods none,pag --scales 3 --layers "
                   f"'{ALL_LAYERS};down;down.2,mid,up.0' {COMMON} --out {MAP}"]),
    dict(title="4. Perturbation ablation: identity vs uniform vs random mask vs logit noise",
         note="Same layer and scale; mask p=0.5 and noise std=1 are the PAG class defaults.",
         commands=[f"pagkit eval --model fmnist --methods pag --scales {BEST_SCALE} --layers {BEST_LAYERS} "
                   f"--perturbations identity,uniform,mask,noise {COMMON} --out {MAP}"]),
    dict(title="5. Class-conditional `fmnist-cond`: CFG, PAG, CFG+PAG",
         note="Classes cycle through 0–9 (balanced); ∅ = class 10. CFG w in diffusers' convention (1 = off).",
         commands=[f"pagkit eval --model fmnist-cond --methods none,cfg,pag,cfg+pag --cfg-scales 1.5,3 "
                   f"--scales {BEST_SCALE} --layers {BEST_LAYERS} {COMMON} --out {MAP}"]),
    dict(title="6. Samplers: DDIM-20/25/50 against DDPM-100/250, best PAG configuration (and SEG under DDPM)",
         note="DDPM-250 costs 12.5× DDIM-20 per sample (about one core-hour for both rows on one thread).",
         commands=[*(f"pagkit eval --model fmnist --methods none,pag --scales {BEST_SCALE} --layers {BEST_LAYERS} "
                     f"--scheduler {s} --steps {n} --num-samples 500 --seed-sets 0 --quiet --out {MAP}"
                     for s, n in (("ddim", 25), ("ddim", 50), ("ddpm", 100), ("ddpm", 250))),
                   # under DDPM: a smaller PAG scale, and SEG (the best DDIM-20 guidance)
                   f"pagkit eval --model fmnist --methods pag --scales 0.25 --layers {BEST_LAYERS} --scheduler ddpm "
                   f"--steps 100 --num-samples 500 --seed-sets 0 --quiet --out {MAP}",
                   f"pagkit eval --model fmnist --methods seg --scales {SEG_SCALE} --seg-sigmas inf --layers "
                   f"{SEG_LAYERS} --scheduler ddpm --steps 100 --num-samples 500 --seed-sets 0 --quiet --out {MAP}"]),
    dict(title="7. SEG and SAG over their axes; PAG guidance intervals; model strength",
         note="SEG and SAG layers: each self-attention layer alone (for SAG, the layer whose attention map makes "
              "the blur mask). Intervals are thirds of the trajectory (0 = pure noise). Model strength uses the "
              "training run's EMA checkpoints (runs/fmnist/ema-*pct, made by `pagkit train`).",
         commands=[f"pagkit eval --model fmnist --methods seg --scales 1,3,5 --layers {SEG_LAYERS} "
                   f"--seg-sigmas inf,2 {COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods sag --scales 0.3,0.75,1.5 --sag-layers mid {COMMON} "
                   f"--out {MAP}",
                   f"pagkit eval --model fmnist --methods pag --scales {BEST_SCALE} --layers {BEST_LAYERS} "
                   f"--intervals {THIRDS} {COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods seg --scales {SEG_SCALE} --seg-sigmas inf --layers "
                   f"'{ALL_LAYERS}' {COMMON} --out {MAP}",
                   f"pagkit eval --model runs/fmnist/ema-50pct --methods none,pag --scales 3 --layers down.1 "
                   f"{COMMON} --out {MAP}",
                   f"pagkit eval --model runs/fmnist/ema-50pct --methods pag --scales {BEST_SCALE} "
                   f"--layers {BEST_LAYERS} {COMMON} --out {MAP}",
                   f"pagkit eval --model runs/fmnist/ema-25pct --methods none,pag --scales {BEST_SCALE} "
                   f"--layers {BEST_LAYERS} {COMMON} --out {MAP}",
                   # SEG and SAG over the same axes: intervals, model strength, and SAG's attention layer
                   f"pagkit eval --model fmnist --methods seg --scales {SEG_SCALE} --seg-sigmas inf "
                   f"--layers {SEG_LAYERS} --intervals {THIRDS} {COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods sag --scales {SAG_SCALE} --sag-layers mid "
                   f"--intervals {THIRDS} {COMMON} --out {MAP}",
                   *(f"pagkit eval --model runs/fmnist/ema-{pct}pct --methods seg --scales {SEG_SCALE} "
                     f"--seg-sigmas inf --layers {SEG_LAYERS} {COMMON} --out {MAP}" for pct in (25, 50)),
                   *(f"pagkit eval --model runs/fmnist/ema-{pct}pct --methods sag --scales {SAG_SCALE} "
                     f"--sag-layers mid {COMMON} --out {MAP}" for pct in (25, 50)),
                   f"pagkit eval --model fmnist --methods sag --scales {SAG_SCALE} --sag-layers "
                   f"{ALL_LAYERS.replace(';', ',')} {COMMON} --out {MAP}"]),
    dict(title="9. The completed map: every self-attention site alone at small scales (PAG and SEG)",
         note="Seed set 0, 500 samples per row, DDIM-20 (issue 22). Tables 2 and 3 tried small PAG scales on the "
              "encoder layers only and every layer only at s = 3; here every site gets every small scale, SEG "
              "(σ = ∞) gets the same sweep, and PAG s = 1 on `mid` is paired with each of its neighbours. The last "
              "two rows repeat no guidance and the best PAG setting so far (section 9a) under `trailing` timestep "
              "spacing (DDIM-20 from t = 999, as the issue's independent loop) instead of the shipped scheduler's "
              "`leading` (from t = 950).",
         commands=[f"pagkit eval --model fmnist --methods none,pag --scales 0.25,0.5,1,1.5,2 --layers '{ALL_LAYERS}' "
                   f"{COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods seg --scales 0.5,1,2 --seg-sigmas inf "
                   f"--layers '{ALL_LAYERS}' {COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods pag --scales 1 --layers 'mid,down.2;mid,up.0.attentions.0' "
                   f"{COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods none,pag --scales {MAP9_PAG[1]} --layers {MAP9_PAG[0]} "
                   f"--timestep-spacing trailing {COMMON} --out {MAP}"]),
    dict(title="10. Guidance intervals for the shipped settings (the interval presets)",
         note="Seed set 0, 500 samples per row, DDIM-20 (issue 19, item 1): table 9a's PAG and SEG settings on "
              "`fmnist`, and CFG w = 1.5 + PAG on `fmnist-cond`, each applied on a third or a half of the "
              "trajectory only (0 = pure noise; a step runs the term when its progress is in [start, stop)). A "
              "step outside the interval runs no perturbed branch, so an interval of a third costs about a third "
              "of the term's extra forward. The unguided and full-trajectory rows repeat tables 9 and 5.",
         commands=[f"pagkit eval --model fmnist --methods none,pag --scales {MAP9_PAG[1]} --layers {MAP9_PAG[0]} "
                   f"--intervals 0:1,{INTERVALS} {COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods seg --scales {MAP9_SEG[1]} --seg-sigmas inf "
                   f"--layers {MAP9_SEG[0]} --intervals 0:1,{INTERVALS} {COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist-cond --methods cfg,cfg+pag --cfg-scales 1.5 --scales {MAP9_PAG[1]} "
                   f"--layers {MAP9_PAG[0]} --intervals 0:1,{INTERVALS} {COMMON} --out {MAP}"]),
    dict(title="11. The perturbation family on `fmnist`: SLG, TPG, SoftPAG, autoguidance, APG-projected PAG and SEG",
         note="Seed set 0, 500 samples per row, DDIM-20 (issue 17, item 4): each new method that applies to a UNet, "
              "on the sites where PAG and SEG help (table 9a; `mid` and `down.2` beside them for the block-level "
              "methods), at scales in its own convention (SLG s, TPG s, PAG s with SoftPAG's strength α, Karras' "
              "w for autoguidance with `fmnist-weak`). SLG's interval is open at both ends as diffusers' (0:1 "
              "skips step 0). APG with η = 0 (`rule=apg(eta=0)`) keeps only the part of PAG's or SEG's difference "
              "orthogonal to ε, at scales up to 5, beside the plain term at the same scales: does removing the "
              "parallel part remove the oversaturation (mean pixel, class TV) that stops PAG at s = 0.5? The "
              "unguided row is table 9's.",
         commands=[f"pagkit eval --model fmnist --methods none,slg --scales 0.25,0.5,1 "
                   f"--layers '{MAP9_PAG[0]};mid;down.2' --intervals 0:1 {COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods tpg --scales 0.5,1,2 --layers '{MAP9_PAG[0]};mid' "
                   f"{COMMON} --out {MAP}",
                   *(f"pagkit eval --model fmnist --methods pag --scales 1,2 --layers {MAP9_PAG[0]} "
                     f"--options strength={alpha} {COMMON} --out {MAP}" for alpha in (0.25, 0.5)),
                   f"pagkit eval --model fmnist --methods pag --scales 0.5,1,2,3,5 --layers {MAP9_PAG[0]} "
                   f"--options 'rule=apg(eta=0)' {COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods pag --scales 3,5 --layers {MAP9_PAG[0]} {COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods seg --scales 1,2,3,5 --seg-sigmas inf --layers {MAP9_SEG[0]} "
                   f"--options 'rule=apg(eta=0)' {COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods seg --scales 3,5 --seg-sigmas inf --layers {MAP9_SEG[0]} "
                   f"{COMMON} --out {MAP}",
                   f"pagkit eval --model fmnist --methods autoguidance --scales 1.25,1.5,2,3 "
                   f"--options weak_model=fmnist-weak {COMMON} --out {MAP}"]),
    dict(title="12. Quality against cost: the cheaper variants of PAG and SEG, and folding (the frontier)",
         note="Seed sets 1 and 2 (fresh seeds), 2,000 samples per seed set, DDIM-20 (issue 19, item 2): table 9a's "
              "PAG and SEG settings on `fmnist` on the full trajectory, on the middle third and the first half, and "
              "with the difference cached for k = 2, 3, 4 steps (`cache=k`); on `fmnist-cond`, CFG w = 1.5 alone, "
              "with PAG, and with PAG folded into CFG's unconditional rows (`fold=true`: no extra row). One "
              "command per seed set and line, so two cores can share the work; the frontier below adds the cost "
              "measured by `pagkit bench` and lists the 10,000-sample commands for the points on the front.",
         # (model, eval's method arguments); the intervals and caches are pagkit.bench's FRONTIER_INTERVALS and
         # FRONTIER_CACHES, which the bench times (tests/test_frontier.py checks they are the same rows)
         commands=[f"pagkit eval --model {model} --methods {methods} --num-samples 2000 --seed-sets {seeds} "
                   f"--quiet --out {REPORT}"
                   for pag, seg, cache in [(f"--scales {MAP9_PAG[1]} --layers {MAP9_PAG[0]}",
                                            f"--scales {MAP9_SEG[1]} --layers {MAP9_SEG[0]} --seg-sigmas inf",
                                            "--options cache=2 --options cache=3 --options cache=4")]
                   for model, methods in (("fmnist", f"none,pag {pag} --intervals 0:1,0.33:0.67,0:0.5"),
                                          ("fmnist", f"pag {pag} {cache}"),
                                          ("fmnist", f"seg {seg} --intervals 0:1,0.33:0.67,0:0.5"),
                                          ("fmnist", f"seg {seg} {cache}"),
                                          ("fmnist-cond", f"cfg,cfg+pag --cfg-scales 1.5 {pag}"),
                                          ("fmnist-cond", f"cfg+pag --cfg-scales 1.5 {pag} --options fold=true"))
                   for seeds in (1, 2)],
         aggregate=True, section="frontier"),
]


RESTORE = "runs/restore1k"
# PAG's restoration setting, chosen on test images 9000-9099 by docs/tune_restore.py (its rule is in its docstring):
# pagkit restore's defaults
RESTORE_PAG_LAYERS, RESTORE_PAG_SCALE = ",".join(DEFAULT_RESTORE_PAG_LAYERS), f"{DEFAULT_RESTORE_PAG_SCALE:g}"
RESTORE_TASKS = ("box-inpaint", "gaussian-deblur", "random-inpaint", "motion-deblur", "sr4")
RESTORE_COMMANDS = (["python docs/tune_restore.py"]
                    + [f"pagkit restore --task {task} --test-images 1000 --steps 50 --pag-scale {RESTORE_PAG_SCALE} "
                       f"--pag-layers {RESTORE_PAG_LAYERS} --seed 0 --quiet --out {RESTORE}" for task in RESTORE_TASKS])


def _configs(command: str):
    from pagkit.cli import build_parser, eval_configs
    args = build_parser().parse_args(shlex.split(command)[1:])
    configs = eval_configs(args)
    return Path(args.out), configs


def _sweep_folders() -> list[Path]:
    """Every sweep folder the tables' commands write to (relative to the checkout), in order."""
    folders = list(dict.fromkeys(_configs(c)[0] for t in TABLES for c in t["commands"]))
    names = [f.name for f in folders]
    assert len(set(names)) == len(names), f"two sweep folders share a name in docs/evidence: {names}"
    return folders


def _evidence(out: Path) -> Path:
    return EVIDENCE / Path(out).name


def _same_space(a: Path, b: Path) -> bool:
    return not (a.is_file() and b.is_file()) or json.loads(a.read_text()) == json.loads(b.read_text())


def archive() -> int:
    """Copy every finished result of the sweep folders into docs/evidence (and its feature_space.json).

    Only rows with the second network's FD (``fd_b``) are kept; a folder measured on another feature space
    than its evidence is left out, with a warning. Returns the number of files copied."""
    copied = 0
    for out in _sweep_folders():
        folder, evidence = ROOT / out, _evidence(out)
        space = folder / "feature_space.json"
        if not (folder / "results").is_dir() or not space.is_file():
            continue
        if not _same_space(space, evidence / "feature_space.json"):
            print(f"warning: {out} is measured on another feature space than {evidence}: not archived")
            continue
        for path in sorted((folder / "results").glob("*.json")):
            row = json.loads(path.read_text())
            target = evidence / path.name
            if "fd_b" not in row["metrics"] or (target.is_file() and target.read_bytes() == path.read_bytes()):
                continue
            evidence.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied += 1
        if evidence.is_dir() and not (evidence / "feature_space.json").is_file():
            shutil.copyfile(space, evidence / "feature_space.json")
    return copied


def seed_from_evidence() -> int:
    """Before running: give each sweep folder the archived results it lacks (and their feature space), so
    `pagkit eval` skips finished configurations. Returns the number of files copied."""
    copied = 0
    for out in _sweep_folders():
        folder, evidence = ROOT / out, _evidence(out)
        if not (evidence / "feature_space.json").is_file():
            continue
        if not _same_space(folder / "feature_space.json", evidence / "feature_space.json"):
            print(f"warning: {out} is measured on another feature space than {evidence}: not seeded")
            continue
        (folder / "results").mkdir(parents=True, exist_ok=True)
        if not (folder / "feature_space.json").is_file():
            shutil.copyfile(evidence / "feature_space.json", folder / "feature_space.json")
        for path in sorted(evidence.glob("*.json")):
            if path.name != "feature_space.json" and not (folder / "results" / path.name).is_file():
                shutil.copyfile(path, folder / "results" / path.name)
                copied += 1
    return copied


def score_finished(tables: set[int] | None = None, threads: int = 1) -> int:
    """Score every configuration of the tables whose sample shards are all made and whose result is
    missing; never samples (shards still missing are left to `pagkit eval` or docs/map_shards.py)."""
    import torch

    from pagkit.evaluate import Sweep, _claim_feature_space
    torch.set_num_threads(threads)
    scored = 0
    for table in TABLES:
        if tables is not None and int(table["title"].split(".")[0]) not in tables:
            continue
        for command in table["commands"]:
            out, configs = _configs(command)
            sweep = Sweep(ROOT / out, configs, progress=False)
            ready = [c for c in configs if not sweep.result_path(c).is_file()
                     and all(sweep.shard_path(c, k).is_file() for k in range(sweep.num_shards(c)))]
            if not ready:
                continue
            _claim_feature_space(sweep.out / "feature_space.json", sweep.feature_space())
            for config in ready:
                sweep.write_result(config)
                scored += 1
                print(f"scored {config.key}", flush=True)
    return scored


def _rows(table: dict) -> tuple[list[dict], list[str]]:
    """The table's finished rows (from the sweep folder, else docs/evidence) and the keys still missing."""
    rows, missing, seen = [], [], set()
    for command in table["commands"]:
        out, configs = _configs(command)
        for config in configs:
            if (out, config.key) in seen:  # a row two commands share (e.g. SAG s=0.75 on mid) is shown once
                continue
            seen.add((out, config.key))
            path = ROOT / out / "results" / f"{config.key}.json"
            archived = _evidence(out) / f"{config.key}.json"
            older = _evidence(out) / "pre-b" / f"{config.key}.json"  # docs/evidence_migrate.py: no fd_b
            for source in (path, archived, older):
                if source.is_file():
                    rows.append(json.loads(source.read_text()))
                    break
            else:
                missing.append(config.key)
    return rows, missing


def _describe(c: dict, options: bool = False) -> list[str]:
    """A row's configuration cells; ``options``: with the further fields (``--options``, e.g. SoftPAG's strength,
    a rule) as a column of their own, for tables that have rows differing in them only."""
    sigma = c["sigma"]
    extra = [", ".join(f"{k}={v}" for k, v in (c.get("options") or {}).items()) or "—"] if options else []
    return [Path(c["model"]).name, c["method"], f"{c['cfg_scale']:g}", f"{c['scale']:g}",
            "+".join(c["layers"]) or "—", c["perturbation"] if "pag" in c["method"] else "—",
            str(sigma) if c["method"] == "seg" else "—", *extra, f"{c['start']:g}–{c['stop']:g}",
            f"{c['scheduler']}-{c['steps']}", str(c["num_samples"])]


HEADER = ["model", "method", "w", "s", "layers", "perturbation", "σ", "interval", "sampler", "N"]
# fd/kid: the primary network (fmnist-classifier); fd_b/kid_b: the second (fmnist-classifier-b)
METRICS = [("fd", "FD ↓", 3), ("kid", "KID ↓", 4), ("fd_b", "FD (b) ↓", 3), ("kid_b", "KID (b) ↓", 4),
           ("is", "IS ↑", 2), ("precision", "precision", 3),
           ("recall", "recall", 3), ("mean_pixel", "mean pixel", 3), ("class_tv_distance", "class TV ↓", 3),
           ("seconds_per_image", "s/image", 3)]


def _table_lines(rows: list[dict], aggregate: bool) -> list[str]:
    options = any(r["config"].get("options") for r in rows)  # a column only where some row has them
    header = HEADER[:7] + (["options"] if options else []) + HEADER[7:]
    header += (["seeds"] if not aggregate else ["seed sets"]) + [m[1] for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = tuple(_describe(r["config"], options=True)) if aggregate else (r["key"],)
        groups.setdefault(key, []).append(r)
    for group in groups.values():
        cells = _describe(group[0]["config"], options) + [",".join(str(r["config"]["seed_set"]) for r in group)]
        for name, _, digits in METRICS:
            values = [r["metrics"].get(name) for r in group]
            if None in values:  # made before the second network existed
                cells.append("—")
                continue
            mean = statistics.fmean(values)
            spread = (max(values) - min(values)) / 2
            cells.append(f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _label(r: dict) -> str:
    c = r["config"] if "config" in r else r
    layers = c["layers"] if isinstance(c["layers"], str) else "+".join(c["layers"])
    return f"{c['method'].upper()} {'γ' if c['method'] == 'seg' else 's'}={c['scale']:g} on `{layers}`"


def _selection_lines(rows: list[dict], missing: int = 0) -> list[str]:
    """Table 9's choice by the rule of docs/notes/table9.md (pagkit.evaluate.choose_settings)."""
    from pagkit.evaluate import choose_settings, flatten
    # candidates are the map's own sampling (the shipped scheduler's spacing); the trailing-spacing rows of
    # table 9 compare samplers and are not candidates
    flat = [r for r in flatten(rows) if not r["timestep_spacing"]]
    lines = ["### 9a. Selection by the rule fixed before the rows (docs/notes/table9.md)", ""]
    without_b = sum(1 for r in flat if r["fd_b"] is None)
    if missing or without_b:
        lines += [f"**Provisional:** {missing} configurations of this table are not computed yet and {without_b} "
                  "were made before the second network existed (no FD (b); to be remade); the rule is "
                  "applied to the rows with both networks' FD, and its choice can change.", ""]
    used = {"pag": MAP9_PAG, "seg": MAP9_SEG}
    for method, pick in choose_settings(flat).items():
        name = method.upper()
        chosen = pick["chosen"]
        if chosen is not None and (chosen["layers"], f"{chosen['scale']:g}") != (used[method][0].replace(",", "+"),
                                                                            used[method][1]):
            lines.append(f"- **{name}: the rule now chooses {_label(chosen)}, but table 1 and the trailing-spacing "
                         f"rows were made with {method.upper()} {used[method][1]} on `{used[method][0]}` "
                         "(docs/make_results.py, MAP9_*): those rows are to be remade.**")
        if not pick["candidates"]:
            lines.append(f"- {name}: no row with both networks' FD yet.")
            continue
        d = pick["delta"]
        if pick["chosen"] is None:
            text = (f"- {name}: none of {pick['candidates']} settings lowers FD on both networks; "
                    "no guidance stays.")
        else:
            a, b = d[id(pick["chosen"])]
            text = (f"- {name}: **{_label(pick['chosen'])}** (FD {a:+.1f}% on the primary network, {b:+.1f}% on "
                    f"the second; mean {pick['score']:+.1f}%), of {pick['eligible']} settings that lower FD on "
                    f"both ({pick['candidates']} scored).")
        if not pick["agree"]:
            named = [f"the primary network's alone: {_label(pick['best_a'])} ({d[id(pick['best_a'])][0]:+.1f}%)"
                     if pick["best_a"] else "the primary network's alone: none lowers its FD",
                     f"the second's alone: {_label(pick['best_b'])} ({d[id(pick['best_b'])][1]:+.1f}%)"
                     if pick["best_b"] else "the second's alone: none lowers its FD"]
            text += " The networks disagree: " + "; ".join(named) + "."
        lines.append(text)
    return lines + [""]


def _heatmaps(rows: list[dict], number: str) -> list[str]:
    """docs/heatmap_<method>.png from a table's rows: one panel per network."""
    from pagkit.evaluate import draw_heatmaps, fd_change_maps, flatten
    flat = flatten(rows)
    maps_a, maps_b = fd_change_maps(flat, "fd"), fd_change_maps(flat, "fd_b")
    lines = []
    for m in maps_a:
        if sum(o["method"] == m["method"] for o in maps_a) > 1:
            continue  # one variant per method in the document's maps
        panels = [(f"{m['method'].upper()}: primary network (fmnist-classifier)", m)]
        panels += [(f"{m['method'].upper()}: second network (fmnist-classifier-b)", b) for b in maps_b
                   if b["method"] == m["method"] and b["variant"] == m["variant"]]
        name = f"heatmap_{m['method']}.png"
        draw_heatmaps(ROOT / "docs" / name, panels)
        lines += [f"![{m['method'].upper()}: FD change against no guidance, site × scale]({name})", ""]
    if lines:
        lines = [f"Heat maps of table {number}: FD change (%) against the unguided row, site × scale, on each "
                 "network (blue: lower FD; — : not computed).", ""] + lines
    return lines


def _restoration_section() -> tuple[list[str], list[dict]]:
    md = ["## 8. Restoration: DPS and DPS+PAG on `fmnist`", "",
          "Fashion-MNIST test images 0–999, σ_y = 0.05, 50 DDIM steps with η = 1, ζ = 2; both methods "
          "restore the same measurements from the same noise. PSNR/SSIM against the originals (mean ± std over "
          "images), FD of the restorations against the 10k test set. PAG's setting was chosen first, on test "
          "images 9000–9099 (table 8a), by the rule in `docs/tune_restore.py`.", "", "```sh"]
    md += RESTORE_COMMANDS + ["```", ""]
    restored = _restoration_file(ROOT / RESTORE / "metrics.md")
    md += [restored.read_text().strip() if restored.is_file() else "(no rows finished yet)", ""]
    selection = _restoration_file(ROOT / "runs" / "restore_tune" / "selection.md")
    md += ["### 8a. Choosing PAG's restoration setting (test images 9000–9099, 100 per task)", "",
           "FD change and PSNR drop of DPS+PAG against DPS on the same 100 images; FD on 100 images is biased "
           "upwards, so only its changes within a task are read.", "",
           selection.read_text().strip() if selection.is_file() else "(not run yet)"]
    notes = ROOT / "docs" / "notes" / "table8.md"
    if notes.is_file():
        md += ["", notes.read_text().strip()]
    md.append("")
    machine = []
    restored = _restoration_file(ROOT / RESTORE / "metrics.json")
    if restored.is_file():
        machine = [{"table": "8. Restoration", "commands": RESTORE_COMMANDS, **r}
                   for r in json.loads(restored.read_text())]
    return md, machine


def _restoration_file(path: Path) -> Path:
    """A restoration output: archived into docs/evidence/<folder>/ when present, read back from there when
    runs/ lacks it."""
    archived = EVIDENCE / path.parent.name / path.name
    if path.is_file():
        if not archived.is_file() or archived.read_bytes() != path.read_bytes():
            archived.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, archived)
        return path
    return archived


# --- table 12: the quality-against-cost frontier (issue 19, item 2) -----------------------------------------------
FRONTIER_COST = EVIDENCE / "frontier_cost.json"
FRONTIER_BENCH = ("pagkit bench --model demo --steps 20 --threads 1 --rounds 5 "
                  f"--json {FRONTIER_COST.relative_to(ROOT)}")
FRONTIER_PLOT = "frontier.png"
# the target: a variant keeping >= KEEP of its full method's FD gain at <= the cost bound (x its baseline)
FRONTIER_KEEP = 0.8
FRONTIER_BOUND = {"fmnist": 1.10, "fmnist-cond": 1.05}
FRONTIER_FRONT_SAMPLES = 10000
NETWORKS = (("fd", "primary"), ("fd_b", "second"))


def _frontier_points(table: dict) -> list[dict]:
    """Table 12's points in command order: per (model, variant name) its configurations (one per seed set), the
    guidance spec, the baseline it is measured against (no guidance; CFG alone on the conditional model) and the
    full method whose gain it keeps a share of (itself on the full trajectory, uncached, unfolded)."""
    import dataclasses

    from pagkit.bench import frontier_name
    from pagkit.spec import format_spec
    points: dict[tuple, dict] = {}
    for command in table["commands"]:
        for config in _configs(command)[1]:
            terms = config.terms()
            name = frontier_name(terms)
            full = [dataclasses.replace(t, start=0.0, stop=1.0, cache=1, fold=False) if hasattr(t, "fold") else t
                    for t in terms]
            point = points.setdefault((Path(config.model).name, name), dict(
                model=Path(config.model).name, name=name, spec=format_spec(terms), configs=[],
                baseline=frontier_name([t for t in terms if type(t).__name__ == "CFG"]), full=frontier_name(full)))
            point["configs"].append(config)
    return list(points.values())


def _read_row(out: str, key: str) -> dict | None:
    """A finished row of sweep folder ``out`` (docs/evidence when runs/ lacks it), as _rows reads them."""
    for source in (ROOT / out / "results" / f"{key}.json", _evidence(out) / f"{key}.json"):
        if source.is_file():
            return json.loads(source.read_text())
    return None


def _frontier_cost(path: Path = FRONTIER_COST) -> tuple[dict, dict | None]:
    """(model, variant name) -> the bench row (ratio, median_s, guidance spec), and the run's record."""
    if not path.is_file():
        return {}, None
    run = json.loads(path.read_text())
    return {(t["model"], name): row for t in run["tables"] for name, row in t["rows"].items()}, run


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2


def frontier_rows(points: list[dict], rows: dict[str, dict], cost: dict) -> list[dict]:
    """Per point: FD mean and spread per network over its finished seed sets, the change against its baseline
    and the share of its full method's gain kept (both on the seed sets all three have), the measured cost ratio
    (None when not measured, or measured with another spec), and whether it is on its model's Pareto front
    (cost and the FD of every network present at all of its model's points, 2,000-sample rows)."""
    from pagkit.bench import pareto_front
    by_name = {(p["model"], p["name"]): p for p in points}
    out = []
    for p in points:
        done = {c.seed_set: rows[c.key] for c in p["configs"] if c.key in rows and "metrics" in rows[c.key]}
        bench = cost.get((p["model"], p["name"]))
        r = dict(point=p, seed_sets=sorted(done), cost=bench["ratio"] if bench and bench.get("guidance") == p["spec"]
                 else None, cost_other_spec=bool(bench) and bench.get("guidance") != p["spec"], fd={}, change={},
                 share={})
        for metric, _ in NETWORKS:
            values = [done[s]["metrics"].get(metric) for s in sorted(done)]
            if values and None not in values:
                r["fd"][metric] = _mean_spread(values)
        out.append(r)
    done_sets = {(r["point"]["model"], r["point"]["name"]): set(r["seed_sets"]) for r in out}

    def fd_on(name_key, metric, seed_sets):
        q = by_name.get(name_key)
        if q is None:
            return None
        values = []
        for c in q["configs"]:
            row = rows.get(c.key)
            if c.seed_set in seed_sets:
                if row is None or row.get("metrics", {}).get(metric) is None:
                    return None
                values.append(row["metrics"][metric])
        return statistics.fmean(values) if len(values) == len(seed_sets) else None

    for r in out:
        p = r["point"]
        for metric, _ in NETWORKS:
            if metric not in r["fd"]:
                continue
            # the seed sets that the point, its baseline and its full method all have
            seeds = set(r["seed_sets"]) & done_sets.get((p["model"], p["baseline"]), set()) & \
                done_sets.get((p["model"], p["full"]), set())
            if not seeds:
                continue
            mine, base, full = (fd_on((p["model"], p[which]), metric, seeds) for which in ("name", "baseline", "full"))
            if mine is None or base is None or p["name"] == p["baseline"]:
                continue
            r["change"][metric] = 100 * (mine - base) / base
            if full is not None and base - full > 0:
                r["share"][metric] = (base - mine) / (base - full)
    for model in dict.fromkeys(r["point"]["model"] for r in out):
        mine = [r for r in out if r["point"]["model"] == model and r["cost"] is not None and r["fd"]]
        metrics = [m for m, _ in NETWORKS if all(m in r["fd"] for r in mine)]
        for r, on in zip(mine, pareto_front([r["cost"] for r in mine],
                                            [tuple(r["fd"][m][0] for m in metrics) for r in mine])):
            r["front"] = on
    return out


def frontier_target(table_rows: list[dict]) -> list[str]:
    """The variants that meet the issue's target: >= FRONTIER_KEEP of the full method's gain on every network
    measured, at a cost <= FRONTIER_BOUND[model] x the baseline's."""
    met = []
    for r in table_rows:
        p = r["point"]
        if p["name"] in (p["baseline"], p["full"]) or r["cost"] is None or not r["share"]:
            continue
        if r["cost"] <= FRONTIER_BOUND.get(p["model"], 0) and all(
                r["share"].get(m, -1) >= FRONTIER_KEEP for m in r["fd"]):
            met.append(f"{p['model']}: {p['name']}")
    return met


def _eval_command(config, num_samples: int, out: str = REPORT) -> str:
    """The `pagkit eval` line of one configuration at ``num_samples`` (checked: it parses back to that key)."""
    from dataclasses import replace
    parts = ["pagkit eval", f"--model {config.model}", f"--methods {config.method}"]
    if "cfg" in config.method:
        parts.append(f"--cfg-scales {config.cfg_scale:g}")
    if config.guided:
        parts += [f"--scales {config.scale:g}", f"--layers {shlex.quote(','.join(config.layers))}"]
        if config.guided == "seg":
            parts.append(f"--seg-sigmas {config.sigma:g}")
        if config.perturbation != "identity" and "pag" in config.method:
            parts.append(f"--perturbations {config.perturbation}")
        if (config.start, config.stop) != (0.0, 1.0):
            parts.append(f"--intervals {config.start:g}:{config.stop:g}")
        if config.options:
            parts.append("--options " + shlex.quote(",".join(f"{k}={v}" for k, v in config.options)))
    if (config.scheduler, config.steps) != ("ddim", 20):
        parts += [f"--scheduler {config.scheduler}", f"--steps {config.steps}"]
    if config.timestep_spacing:
        parts.append(f"--timestep-spacing {config.timestep_spacing}")
    parts += [f"--num-samples {num_samples}", f"--seed-sets {config.seed_set}", "--quiet", f"--out {out}"]
    command = " ".join(parts)
    made = [c.key for c in _configs(command)[1]]
    assert made == [replace(config, num_samples=num_samples).key], (command, made)
    return command


def front_commands(table_rows: list[dict], num_samples: int = FRONTIER_FRONT_SAMPLES) -> list[str]:
    """The eval lines (one per seed set) for the points on the front and the references they are read against
    (their baseline and full method), at ``num_samples``; empty until a front is known."""
    wanted = {(r["point"]["model"], r["point"]["name"]) for r in table_rows if r.get("front")}
    for r in table_rows:
        if r.get("front"):
            wanted |= {(r["point"]["model"], r["point"]["baseline"]), (r["point"]["model"], r["point"]["full"])}
    return [_eval_command(c, num_samples) for r in table_rows
            if (r["point"]["model"], r["point"]["name"]) in wanted for c in r["point"]["configs"]]


def _cell(pair, digits: int) -> str:
    return "—" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def _frontier_plot(table_rows: list[dict], path: Path) -> bool:
    """FD against measured cost, one panel per model and network, the front connected; False when no point
    has both a cost and an FD."""
    drawn = [r for r in table_rows if r["cost"] is not None and r["fd"]]
    if not drawn:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["point"]["model"] for r in drawn))
    metrics = [m for m in NETWORKS if any(m[0] in r["fd"] for r in drawn)]
    fig, axes = plt.subplots(len(metrics), len(models), figsize=(5.5 * len(models), 4 * len(metrics)),
                             squeeze=False)
    for col, model in enumerate(models):
        for row, (metric, network) in enumerate(metrics):
            ax = axes[row][col]
            mine = sorted((r for r in drawn if r["point"]["model"] == model and metric in r["fd"]),
                          key=lambda r: r["cost"])
            for r in mine:
                mean, spread = r["fd"][metric]
                colour = "C3" if r.get("front") else "C0"
                ax.errorbar([r["cost"]], [mean], yerr=[spread], fmt="o", color=colour, capsize=3)
                ax.annotate(r["point"]["name"], (r["cost"], mean), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
            front = [r for r in mine if r.get("front")]
            ax.plot([r["cost"] for r in front], [r["fd"][metric][0] for r in front], "-", color="C3",
                    label="Pareto front")
            bound = FRONTIER_BOUND.get(model)
            if bound:
                ax.axvline(bound, ls=":", color="grey", label=f"target cost ≤ {bound:.2f}×")
            base = mine[0]["point"]["baseline"] if mine else ""
            ax.set_xlabel(f"measured cost (× {base})")
            ax.set_ylabel(f"FD ({network} network) ↓")
            ax.set_title(f"{model}: FD against cost ({network} network)", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _frontier_section(table: dict, cost_path: Path = FRONTIER_COST, plot: Path | None = None) -> list[str]:
    """Table 12's frontier: per point FD, change, share of the full method's gain, measured cost, the front
    marked; whether the target is met; the plot; the bench command and the 10,000-sample lines for the front."""
    points = _frontier_points(table)
    rows = {}
    for p in points:
        for c in p["configs"]:
            row = _read_row(REPORT, c.key)
            if row is not None:
                rows[c.key] = row
    cost, run = _frontier_cost(cost_path)
    table_rows = frontier_rows(points, rows, cost)
    from dataclasses import replace
    big = {}  # the front's 10,000-sample rows, where made: (model, name) -> {metric: (mean, spread)}
    for r in table_rows:
        made = [_read_row(REPORT, replace(c, num_samples=FRONTIER_FRONT_SAMPLES).key) for c in r["point"]["configs"]]
        made = [m for m in made if m is not None and "metrics" in m]
        big[id(r)] = {m: _mean_spread([x["metrics"][m] for x in made]) for m, _ in NETWORKS
                      if made and all(x["metrics"].get(m) is not None for x in made)}
    md = ["### 12a. The frontier: FD against measured cost", "",
          "Cost: the median wall time of one sampling run (DDIM-20, same noise, rounds interleaved) divided by the "
          "baseline's, measured by the bench command below on the shipped models; on `fmnist` the baseline is no "
          "guidance, so the cost is in unguided-sampler equivalents (forward passes per step: an exact PAG or SEG "
          "step adds a perturbed row, less the prefix it shares with the plain one); on `fmnist-cond` it is CFG "
          "w = 1.5 alone (its two rows per step = 1). FD: mean ± spread (half the range) over the seed sets done; "
          "change and share on the seed sets that the point, its baseline and its full method all have: share = "
          "(FD_baseline − FD_variant) / (FD_baseline − FD_full), per network (primary / second; — where the full "
          "method lowers no FD on that network). On the front (★): no other point of the model is as cheap and as "
          "good on every network (2,000-sample rows; the spread is not taken into account).",
          "", "```sh", FRONTIER_BENCH, "```", ""]
    if run is None:
        shown = cost_path.relative_to(ROOT) if cost_path.is_relative_to(ROOT) else cost_path
        md += [f"Cost not measured yet (no `{shown}`).", ""]
    else:
        load = run.get("load_before", {})
        md += [f"Cost measured {run['date']}: `{run['command']}` ({run['steps']} steps, batch {run['batch']}, "
               f"{run['rounds']} rounds, {run['threads']} thread(s); load average {load.get('load_1m')} on "
               f"{load.get('cpus')} CPUs before, {run.get('load_after', {}).get('load_1m')} after: other jobs were "
               "running, which interleaving spreads over all rows alike).", ""]
        from pagkit.evaluate import MICRO_BATCH
        if run["batch"] != MICRO_BATCH:
            md += [f"The bench sampled batches of {run['batch']}; eval samples {MICRO_BATCH} at a time "
                   "(pagkit.evaluate.MICRO_BATCH), where per-call overheads weigh less: `--batch "
                   f"{MICRO_BATCH}` measures at eval's size (slower: about 40 s per run on one thread).", ""]
        within = []
        for model, bound in FRONTIER_BOUND.items():
            names = [f"{name} ({row['ratio']:.2f})" for (m, name), row in cost.items()
                     if m == model and row.get("guidance") and 1 < row["ratio"] <= bound]
            within.append(f"`{model}` (≤ {bound:.2f}×): " + (", ".join(names) if names else
                          "**none**: whatever their FD, no variant can meet the target there at this cost"))
        md += ["Variants within the target's cost bound, measured: " + "; ".join(within) + ".", ""]
        if run["steps"] != 20:
            md += [f"**The cost was measured at {run['steps']} steps, the rows at 20: intervals and caching cost "
                   "a different share there; re-run the bench command above.**", ""]
    if not any(r["fd"] for r in table_rows):
        md += ["(no rows finished yet: the frontier is drawn once table 12's rows are made)", ""]
    header = ["model", "point", "seed sets", "FD ↓", "FD (b) ↓", "FD change", "FD (b) change", "share of gain",
              "cost (× baseline)", "front", "FD ↓ at 10k", "FD (b) ↓ at 10k"]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table_rows:
        p = r["point"]
        changes = [f"{r['change'][m]:+.1f}%" if m in r["change"] else "—" for m, _ in NETWORKS]
        # per network (primary / second); — where the full method lowers no FD there (no gain to keep)
        share = " / ".join(f"{r['share'][m]:.0%}" if m in r["share"] else "—" for m, _ in NETWORKS) \
            if r["share"] else "—"
        cost_cell = (f"{r['cost']:.2f}" if r["cost"] is not None else "(other setting)" if r["cost_other_spec"]
                     else "—")
        md.append("| " + " | ".join([p["model"], f"{p['name']} (`{p['spec']}`)",
                                      ",".join(map(str, r["seed_sets"])) or "—", _cell(r["fd"].get("fd"), 3),
                                      _cell(r["fd"].get("fd_b"), 3), *changes, share, cost_cell,
                                      "★" if r.get("front") else "", _cell(big[id(r)].get("fd"), 3),
                                      _cell(big[id(r)].get("fd_b"), 3)]) + " |")
    md.append("")
    if any(r["seed_sets"] for r in table_rows):  # every metric of the 2,000-sample rows, per point
        names = [m[1] for m in METRICS]
        md += ["Every metric of the 2,000-sample rows (mean ± spread over the seed sets):", "",
               "| model | point | seed sets | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 3)]
        for r in table_rows:
            done = [rows[c.key] for c in r["point"]["configs"] if c.key in rows and "metrics" in rows[c.key]]
            if not done:
                continue
            cells = []
            for name, _, digits in METRICS:
                values = [x["metrics"].get(name) for x in done]
                cells.append("—" if None in values else _cell(_mean_spread(values), digits))
            md.append(f"| {r['point']['model']} | {r['point']['name']} | {','.join(map(str, r['seed_sets']))} | "
                      + " | ".join(cells) + " |")
        md.append("")
    measured = [r for r in table_rows if r["cost"] is not None and r["share"]]
    if measured:
        met = frontier_target(table_rows)
        bounds = ", ".join(f"≤ {b:.2f}× on `{m}`" for m, b in FRONTIER_BOUND.items())
        md += [f"Target (issue 19): a variant keeping ≥ {FRONTIER_KEEP:.0%} of its full method's FD gain on every "
               f"network at a cost {bounds}: " + (("**met** by " + ", ".join(met) + ".") if met else
                                                   "**not met** by any variant measured (finding)."), ""]
    if plot is None:
        plot = ROOT / "docs" / FRONTIER_PLOT
    if _frontier_plot(table_rows, plot):
        md += [f"![FD against measured cost, Pareto front connected]({plot.name})", ""]
    commands = front_commands(table_rows)
    md += [f"The {FRONTIER_FRONT_SAMPLES:,}-sample rows for the points on the front and their references "
           "(table 1 has the unguided and full-method ones):", ""]
    md += (["```sh", *commands, "```"] if commands else
           ["(none yet: the front is known once the 2,000-sample rows and the cost are in)"])
    return md + [""]


def build(prologue: str = "") -> None:
    from pagkit import io
    copied = archive()
    md = ["# pagkit results on the shipped Fashion-MNIST models", "",
          "Generated by `python docs/make_results.py` from the sweep folders (and, for rows made in earlier "
          "sessions, from their archived copies in `docs/evidence/`); every row is also in "
          "`docs/results.json` with its full configuration and metrics. FD/KID/IS/precision/recall use the "
          "features of the shipped Fashion-MNIST classifier (`src/pagkit/models/fmnist-classifier`) against the "
          "10,000 test images; FD (b) and KID (b) the features of a second, independently trained classifier "
          "of another architecture and seed (`src/pagkit/models/fmnist-classifier-b`; — : a row made before "
          "it existed). Scales: PAG s and SEG γ in the papers' convention (0 = off), CFG w in "
          "diffusers' (1 = off). s/image is wall time on a shared 2-core machine with other jobs running: "
          "compare it within a table only.", ""]
    summary = ROOT / "docs" / "notes" / "summary.md"
    for text in (prologue, summary.read_text().strip() if summary.is_file() else ""):
        if text:
            md += [text, ""]
    machine = []
    restoration_done = False
    for table in sorted(TABLES, key=lambda t: int(t["title"].split(".")[0])):
        number = table["title"].split(".")[0]
        if int(number) > 8 and not restoration_done:  # table 8 (restoration) is not one of TABLES
            section, rows8 = _restoration_section()
            md += section
            machine += rows8
            restoration_done = True
        rows, missing = _rows(table)
        md += [f"## {table['title']}", "", table["note"], "", "```sh"] + table["commands"] + ["```", ""]
        if table.get("section") == "frontier":  # table 12: its own rows name the variants (options, intervals)
            md += _frontier_section(table)
        else:
            md += _table_lines(rows, table.get("aggregate", False)) if rows else ["(no rows finished yet)"]
        if missing:
            md += ["", f"Not computed in this session ({len(missing)} configurations): "
                   + ", ".join(f"`{k}`" for k in missing)]
        if number == "9":
            md += [""] + _heatmaps(rows, number) + _selection_lines(rows, len(missing))
        notes = ROOT / "docs" / "notes" / f"table{number}.md"
        if notes.is_file():
            md += ["", notes.read_text().strip()]
        md.append("")
        machine += [{"table": table["title"], "commands": table["commands"], **r} for r in rows]
    if not restoration_done:
        section, rows8 = _restoration_section()
        md += section
        machine += rows8
    with io.atomic_path(ROOT / "docs" / "results.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")
    io.write_json(ROOT / "docs" / "results.json", machine)
    print(f"wrote docs/results.md and docs/results.json ({len(machine)} rows; {copied} new files in docs/evidence)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="store_true", help="run the tables' commands first (resumable)")
    parser.add_argument("--score", action="store_true",
                        help="first score every configuration whose shards are all made (no sampling)")
    parser.add_argument("--tables", default=None, help="comma-separated table numbers (default: all)")
    parser.add_argument("--threads", default="1", help="torch threads per command")
    args = parser.parse_args()
    import os
    os.chdir(ROOT)  # the commands' --out folders are relative to the checkout
    chosen = None if args.tables is None else {int(v) for v in args.tables.split(",")}
    if args.run or args.score:
        print(f"seeded {seed_from_evidence()} results from docs/evidence")
    if args.score:
        print(f"scored {score_finished(chosen, int(args.threads))} configurations")
    if args.run:
        from pagkit.cli import main as pagkit_main
        # numbered as in the document: table 8 (restoration) is not one of TABLES
        jobs = [(int(t["title"].split(".")[0]), t["commands"]) for t in TABLES] + [(8, RESTORE_COMMANDS)]
        for number, commands in jobs:
            if chosen is not None and number not in chosen:
                continue
            for command in commands:
                print(f"$ {command}", flush=True)
                if command.startswith("python "):  # the tuning script
                    code = subprocess.call([sys.executable, *shlex.split(command)[1:]], cwd=ROOT)
                else:
                    code = pagkit_main(shlex.split(command)[1:] + ["--threads", args.threads])
                if code:
                    return code
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
