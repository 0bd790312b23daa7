"""Choose PAG's setting for the restoration table on a split kept apart from it.

    python docs/tune_restore.py          # restore (resumable), then print and save the choice

DPS and DPS+PAG at several (layers, s) restore Fashion-MNIST test images 9000-9099 for box inpainting
and Gaussian deblurring (the two tasks the issue names); the table in docs/results.md then uses images
0-999. The rule, fixed before the runs: the lowest mean relative FD change over the two tasks, among
settings whose PSNR drop is at most 0.5 dB on both.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "restore_tune"
TASKS = ("box-inpaint", "gaussian-deblur")
SETTINGS = [("down.2", 0.5), ("down.2", 1.0), ("down.2", 2.0), ("down.2", 3.0), ("down.1", 0.5), ("mid", 2.0)]
FIRST_IMAGE, NUM_IMAGES = 9000, 100


def methods() -> dict:
    from pagkit.guidance import PAG
    return {"dps": [], **{f"dps+pag-{layers}-s{s:g}": [PAG(s, layers=[layers])] for layers, s in SETTINGS}}


def choose(rows: list[dict]) -> tuple[dict, list[dict]]:
    """(the chosen setting, every setting scored) from restore_eval's result rows."""
    by = {(r["task"], r["method"]): r["metrics"] for r in rows}
    scored = []
    for layers, s in SETTINGS:
        name = f"dps+pag-{layers}-s{s:g}"
        rel = [by[(t, name)]["fd"] / by[(t, "dps")]["fd"] - 1 for t in TASKS]
        drop = [by[(t, "dps")]["psnr"] - by[(t, name)]["psnr"] for t in TASKS]
        scored.append({"layers": layers, "scale": s, "relative_fd": rel, "psnr_drop_db": drop,
                       "mean_relative_fd": sum(rel) / len(rel), "eligible": max(drop) <= 0.5})
    best = min((c for c in scored if c["eligible"]), key=lambda c: c["mean_relative_fd"])
    return best, scored


def main() -> int:
    import torch
    from pagkit import io
    from pagkit.restore import restore_eval
    torch.set_num_threads(1)
    rows = []
    for task in TASKS:
        rows += restore_eval(task, OUT, methods=methods(), num_images=NUM_IMAGES, first_image=FIRST_IMAGE,
                             progress=False)
    best, scored = choose(rows)
    lines = ["| layers | s | FD change, box | FD change, Gaussian | mean | PSNR drop, box (dB) | "
             "PSNR drop, Gaussian (dB) |", "|---|---|---|---|---|---|---|"]
    for c in scored:
        mark = " **(chosen)**" if c is best else ""
        lines.append(f"| {c['layers']}{mark} | {c['scale']:g} | {c['relative_fd'][0]:+.1%} | "
                     f"{c['relative_fd'][1]:+.1%} | {c['mean_relative_fd']:+.1%} | {c['psnr_drop_db'][0]:+.2f} | "
                     f"{c['psnr_drop_db'][1]:+.2f} |")
    io.write_json(OUT / "selection.json", {"chosen": best, "scored": scored})
    with io.atomic_path(OUT / "selection.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
