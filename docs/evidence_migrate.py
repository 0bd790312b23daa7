"""One-time: archive the rows of the last committed docs/results.json (and its restoration section) that
were made before docs/evidence existed, so that rebuilding docs/results.md in a fresh checkout (runs/ empty)
keeps them.

    python docs/evidence_migrate.py [REV]        # default HEAD: git show REV:docs/results.json / results.md

Eval rows go to docs/evidence/<sweep folder>/pre-b/<key>.json: they carry no second-network numbers
(FD (b) shows "—"), and `make_results.py --run` never seeds them into a sweep folder, so rerunning a table
recomputes them with both networks. Restoration: docs/evidence/restore1k/metrics.{md,json} and
docs/evidence/restore_tune/selection.md, exactly as the document showed them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    import make_results as M
    from pagkit import io
    rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    rows = json.loads(subprocess.check_output(["git", "show", f"{rev}:docs/results.json"], cwd=ROOT))
    md = subprocess.check_output(["git", "show", f"{rev}:docs/results.md"], cwd=ROOT, text=True)
    by_key = {r["key"]: {k: r[k] for k in ("key", "config", "metrics")} for r in rows if "key" in r}
    written = 0
    for table in M.TABLES:
        for command in table["commands"]:
            out, configs = M._configs(command)
            for config in configs:
                if config.key in by_key:
                    io.write_json(M._evidence(out) / "pre-b" / f"{config.key}.json", by_key[config.key])
                    written += 1
    restored = [{k: v for k, v in r.items() if k not in ("table", "commands")} for r in rows
                if r["table"].startswith("8.")]
    if restored:
        section = md[md.index("## 8. Restoration"):md.index("\n## 9.") if "\n## 9." in md else None]
        table = section[section.index("```\n\n") + 5:section.index("### 8a.")].strip()
        tune = section[section.index("### 8a."):]
        tune = tune[tune.index("\n\n| ") + 2:]
        notes = (ROOT / "docs" / "notes" / "table8.md").read_text().strip()
        tune = tune[:tune.index(notes[:40])].strip() if notes[:40] in tune else tune.strip()
        evidence = M.EVIDENCE / Path(M.RESTORE).name
        io.write_json(evidence / "metrics.json", restored)
        (evidence / "metrics.md").write_text(table + "\n")
        (M.EVIDENCE / "restore_tune").mkdir(parents=True, exist_ok=True)
        (M.EVIDENCE / "restore_tune" / "selection.md").write_text(tune + "\n")
    print(f"archived {written} eval rows and {len(restored)} restoration rows from {rev}")


if __name__ == "__main__":
    main()
