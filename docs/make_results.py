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
TABLE1_METHODS = (f"--methods none,pag --scales {BEST_SCALE} --layers {BEST_LAYERS}",
                  f"--methods seg --scales {SEG_SCALE} --layers {SEG_LAYERS} --seg-sigmas inf,2",
                  f"--methods sag --scales {SAG_SCALE} --sag-layers mid",
                  # SAG's best row on the map (table 7: the early third), chosen after the line above was fixed
                  f"--methods sag --scales {SAG_SCALE} --sag-layers mid --intervals {THIRDS.split(',')[0]}",
                  # table 9's choices (section 9a), re-chosen on the completed map
                  f"--methods pag --scales {MAP9_PAG[1]} --layers {MAP9_PAG[0]}",
                  f"--methods seg --scales {MAP9_SEG[1]} --layers {MAP9_SEG[0]} --seg-sigmas inf")
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


def _describe(c: dict) -> list[str]:
    sigma = c["sigma"]
    return [Path(c["model"]).name, c["method"], f"{c['cfg_scale']:g}", f"{c['scale']:g}",
            "+".join(c["layers"]) or "—", c["perturbation"] if "pag" in c["method"] else "—",
            str(sigma) if c["method"] == "seg" else "—", f"{c['start']:g}–{c['stop']:g}",
            f"{c['scheduler']}-{c['steps']}", str(c["num_samples"])]


HEADER = ["model", "method", "w", "s", "layers", "perturbation", "σ", "interval", "sampler", "N"]
# fd/kid: the primary network (fmnist-classifier); fd_b/kid_b: the second (fmnist-classifier-b)
METRICS = [("fd", "FD ↓", 3), ("kid", "KID ↓", 4), ("fd_b", "FD (b) ↓", 3), ("kid_b", "KID (b) ↓", 4),
           ("is", "IS ↑", 2), ("precision", "precision", 3),
           ("recall", "recall", 3), ("mean_pixel", "mean pixel", 3), ("class_tv_distance", "class TV ↓", 3),
           ("seconds_per_image", "s/image", 3)]


def _table_lines(rows: list[dict], aggregate: bool) -> list[str]:
    header = HEADER + (["seeds"] if not aggregate else ["seed sets"]) + [m[1] for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = tuple(_describe(r["config"])) if aggregate else (r["key"],)
        groups.setdefault(key, []).append(r)
    for group in groups.values():
        cells = _describe(group[0]["config"]) + [",".join(str(r["config"]["seed_set"]) for r in group)]
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
