"""Generate the sample shards of the completed evaluation map (issue 22), one configuration at a time.

    python docs/map_shards.py --threads 1            # seed set 0, 500 samples per row, DDIM-20
    python docs/map_shards.py --threads 1 --table 11 --reverse --last autoguidance   # a second process

Only shards are made here (resumable: finished shards are skipped); `python docs/make_results.py --run`
(or the `pagkit eval` lines it lists) then scores every configuration whose shards are complete. The
configurations come from the same command lines as table 9 of docs/results.md, read through the CLI's
own parser, so the shard folders are exactly the ones `pagkit eval` looks for.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", default="9", help="the make_results table whose commands to run")
    parser.add_argument("--reverse", action="store_true",
                        help="last configuration first: a second process (one per core) meets the first midway")
    parser.add_argument("--first", default="",
                        help="comma-separated parts of configuration keys to make first, in that order "
                             "(e.g. pag_s1_Lmid_,seg_s1_Lmid_)")
    parser.add_argument("--only", default="",
                        help="comma-separated parts of configuration keys: make only the configurations with one")
    parser.add_argument("--last", default="",
                        help="comma-separated parts of configuration keys to make last (e.g. autoguidance, whose "
                             "weak model may not be exported yet)")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    import make_results
    from pagkit.evaluate import Sweep
    table = next(t for t in make_results.TABLES if t["title"].split(".")[0] == args.table)
    jobs = []
    for command in table["commands"]:
        out, configs = make_results._configs(command)
        sweep = Sweep(ROOT / out, configs, progress=False)
        jobs += [(sweep, config) for config in configs]
    jobs = jobs[::-1] if args.reverse else jobs
    only = [part for part in args.only.split(",") if part]
    jobs = [job for job in jobs if not only or any(part in job[1].key for part in only)]
    firsts = [part for part in args.first.split(",") if part]
    rank = {id(c): next((i for i, part in enumerate(firsts) if part in c.key), len(firsts)) for _, c in jobs}
    lasts = [part for part in args.last.split(",") if part]
    jobs.sort(key=lambda job: (any(part in job[1].key for part in lasts), rank[id(job[1])]))  # stable otherwise
    for sweep, config in jobs:
        todo = [k for k in range(sweep.num_shards(config)) if not sweep.shard_path(config, k).is_file()]
        if sweep.result_path(config).is_file() or not todo:
            continue
        start = time.perf_counter()
        for k in todo:
            if not sweep.shard_path(config, k).is_file():  # the other process may have made it meanwhile
                sweep.make_shard(config, k)
        print(f"{config.key}: {len(todo)} shards in {time.perf_counter() - start:.0f} s", flush=True)

if __name__ == "__main__":
    main()
