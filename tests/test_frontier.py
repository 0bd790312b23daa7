"""The quality-against-cost frontier (issue 19, item 2): the Pareto front, the bench's JSON and its frontier rows,
and docs/make_results.py's table 12 section rendered from fake rows."""
import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from pagkit import bench
from pagkit.bench import frontier_terms, pareto_front
from pagkit.spec import format_spec

ROOT = Path(__file__).resolve().parents[1]


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "docs" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the front ------------------------------------------------------------------------------------------------------
def test_pareto_front_on_one_network_keeps_exact_ties_and_drops_the_dominated():
    costs = [1.0, 2.0, 1.5, 2.0, 1.2]
    values = [(10.0,), (8.0,), (9.0,), (8.0,), (11.0,)]
    # (1.2, 11) is worse than (1, 10) in both; (2, 8) twice: neither is better, both stay
    assert pareto_front(costs, values) == [True, True, True, True, False]


def test_pareto_front_on_two_networks_needs_no_worse_on_each():
    costs = [1.0, 2.0, 2.0, 3.0]
    values = [(10.0, 5.0), (9.0, 6.0), (11.0, 6.0), (9.5, 4.0)]
    # (2, 9, 6) is better than (2, 11, 6) on one network and as good elsewhere; (3, 9.5, 4) is the best on
    # the second network, so nothing cheaper dominates it
    assert pareto_front(costs, values) == [True, True, False, True]
    assert pareto_front([], []) == []
    assert pareto_front([5.0], [(1.0,)]) == [True]


def test_pareto_front_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 costs for 1 points"):
        pareto_front([1.0, 2.0], [(1.0,)])


# --- the bench ------------------------------------------------------------------------------------------------------
def test_frontier_terms_are_table_12s_rows_by_name_and_spec():
    """The bench times exactly the guidance of table 12's eval rows: same names, same specs."""
    mr = _make_results()
    uncond, cond = frontier_terms()
    assert list(uncond) == ["no guidance", "PAG", "PAG t=0.33–0.67", "PAG t=0–0.5", "PAG cache=2", "PAG cache=3",
                            "PAG cache=4", "SEG", "SEG t=0.33–0.67", "SEG t=0–0.5", "SEG cache=2", "SEG cache=3",
                            "SEG cache=4"]
    assert list(cond) == ["CFG 1.5", "CFG 1.5 + PAG", "CFG 1.5 + PAG folded"]
    made = {**{("fmnist", k): format_spec(v) for k, v in uncond.items()},
            **{("fmnist-cond", k): format_spec(v) for k, v in cond.items()}}
    points = mr._frontier_points(mr.TABLES[-1])
    assert {(p["model"], p["name"]): p["spec"] for p in points} == made
    assert all(len(p["configs"]) == 2 and {c.seed_set for c in p["configs"]} == {1, 2} for p in points)
    assert all(c.num_samples == 2000 for p in points for c in p["configs"])
    full = {(p["model"], p["name"]): (p["baseline"], p["full"]) for p in points}
    assert full["fmnist", "SEG cache=3"] == ("no guidance", "SEG")
    assert full["fmnist-cond", "CFG 1.5 + PAG folded"] == ("CFG 1.5", "CFG 1.5 + PAG")


def test_bench_json_from_a_tiny_run_has_every_frontier_row_and_its_ratios(tmp_path, capsys):
    from pagkit.cli import main
    out = tmp_path / "cost.json"
    assert main(["bench", "--model", "demo", "--steps", "1", "--rounds", "1", "--json", str(out)]) in (None, 0)
    run = json.loads(out.read_text())
    assert (run["steps"], run["rounds"], run["threads"], run["batch"]) == (1, 1, 1, 1)
    assert run["command"].startswith("pagkit bench --model demo --steps 1 ")
    assert {"load_1m", "load_5m", "load_15m", "cpus"} <= set(run["load_before"]) and run["date"]
    (uncond, cond), tables = frontier_terms(), run["tables"]
    assert [t["baseline"] for t in tables] == ["no guidance", "CFG 1.5"]
    for table, terms in zip(tables, (uncond, cond)):
        rows = table["rows"]
        assert set(terms) <= set(rows)
        base = rows[table["baseline"]]["median_s"]
        for name, row in rows.items():
            assert len(row["seconds"]) == 1 and row["median_s"] == row["seconds"][0]
            assert row["ratio"] == row["median_s"] / base
            assert row.get("guidance") == (format_spec(terms[name]) if name in terms else None)
        assert rows[table["baseline"]]["ratio"] == 1.0
    assert "PAG(mid) pagkit" in tables[0]["rows"]  # the demo's own rows stay, interleaved with the frontier's
    assert f"wrote {out}" in capsys.readouterr().out


def test_frontier_cond_configs_run_and_cfg_alone_matches_sample():
    """The conditional rows sample what pagkit.sample does with the same labels and ∅ (here: CFG alone)."""
    import torch
    from diffusers import DDIMScheduler

    from pagkit import CFG, sample
    from pagkit.cli.common import _random_demo_model
    from pagkit.defaults import NULL_CLASS
    model, _ = _random_demo_model(conditional=True)
    configs = bench.frontier_cond_configs(model, steps=1, batch=2)
    assert list(configs) == ["CFG 1.5", "CFG 1.5 + PAG", "CFG 1.5 + PAG folded"]
    size = model.config.sample_size
    latents = torch.randn(2, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    want = sample(model, DDIMScheduler(), batch_size=2, num_inference_steps=1, guidance=[CFG(1.5)], latents=latents,
                  class_labels=torch.tensor([0, 1]), null_class_label=NULL_CLASS, progress_bar=False)
    assert torch.equal(configs["CFG 1.5"](), want)
    for run in configs.values():
        assert run().shape == want.shape


# --- the section ----------------------------------------------------------------------------------------------------
def _fake(mr, fds: dict, missing=()):
    """Result rows for table 12's configurations: fds maps (model, name) -> (fd, fd_b) per seed set 1 and 2."""
    rows = {}
    for p in mr._frontier_points(mr.TABLES[-1]):
        if (p["model"], p["name"]) not in fds:
            continue
        for c in p["configs"]:
            fd, fd_b = fds[p["model"], p["name"]][c.seed_set - 1]
            metrics = {m[0]: 0.5 for m in mr.METRICS} | {"fd": fd, "fd_b": fd_b}
            rows[c.key] = {"key": c.key, "config": {"seed_set": c.seed_set}, "metrics": metrics}
    return rows


def _cost_file(tmp_path, ratios: dict, other_spec=()) -> Path:
    uncond, cond = frontier_terms()
    tables = []
    for model, terms, baseline in (("fmnist", uncond, "no guidance"), ("fmnist-cond", cond, "CFG 1.5")):
        rows = {name: {"ratio": ratios[model, name], "median_s": ratios[model, name],
                       "guidance": "pag:9" if (model, name) in other_spec else format_spec(t)}
                for name, t in terms.items() if (model, name) in ratios}
        tables.append({"model": model, "baseline": baseline, "rows": rows})
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({"date": "2026-12-02T01:00:00+00:00", "command": "pagkit bench --model demo",
                                "steps": 20, "batch": 1, "rounds": 5, "threads": 1,
                                "load_before": {"load_1m": 2.5, "cpus": 2}, "load_after": {"load_1m": 2.7},
                                "tables": tables}))
    return path


def test_the_section_with_no_rows_and_no_cost_says_so(tmp_path):
    mr = _make_results()
    md = mr._frontier_section(mr.TABLES[-1], cost_path=tmp_path / "absent.json", plot=tmp_path / "f.png")
    text = "\n".join(md)
    assert "Cost not measured yet" in text and "(no rows finished yet" in text
    assert "(none yet: the front is known once" in text and "Target" not in text
    assert not (tmp_path / "f.png").exists()
    assert sum(line.startswith("| fmnist") for line in md) == 16  # every point listed, none invented


def test_the_section_from_fake_rows_marks_the_front_the_shares_and_the_target(tmp_path, monkeypatch):
    mr = _make_results()
    fds = {("fmnist", "no guidance"): [(40, 4), (42, 4)],   # mean 41, 4
           ("fmnist", "PAG"): [(32, 2), (34, 2)],           # gain 8 and 2
           ("fmnist", "PAG t=0–0.5"): [(33, 2.5), (35, 2.5)],  # keeps 7/8 and 3/4 of it
           ("fmnist", "PAG cache=2"): [(40, 4), (44, 4)],   # worse than no guidance on the primary at more cost
           ("fmnist-cond", "CFG 1.5"): [(50, 5), (50, 5)],
           ("fmnist-cond", "CFG 1.5 + PAG"): [(42, 4), (42, 4)],
           ("fmnist-cond", "CFG 1.5 + PAG folded"): [(46, 4.5), (46, 4.5)]}  # keeps half
    rows = _fake(mr, fds)
    monkeypatch.setattr(mr, "_read_row", lambda out, key: rows.get(key))
    ratios = {("fmnist", "no guidance"): 1.0, ("fmnist", "PAG"): 2.0, ("fmnist", "PAG t=0–0.5"): 1.5,
              ("fmnist", "PAG cache=2"): 1.5, ("fmnist", "SEG"): 2.0,
              ("fmnist-cond", "CFG 1.5"): 1.0, ("fmnist-cond", "CFG 1.5 + PAG"): 1.5,
              ("fmnist-cond", "CFG 1.5 + PAG folded"): 1.02}
    cost = _cost_file(tmp_path, ratios, other_spec={("fmnist", "SEG")})
    points = mr._frontier_points(mr.TABLES[-1])
    table_rows = {(r["point"]["model"], r["point"]["name"]): r
                  for r in mr.frontier_rows(points, rows, mr._frontier_cost(cost)[0])}
    half = table_rows["fmnist", "PAG t=0–0.5"]
    assert half["fd"] == {"fd": (34.0, 1.0), "fd_b": (2.5, 0.0)}
    assert half["share"] == {"fd": 7 / 8, "fd_b": 3 / 4} and half["change"]["fd"] == 100 * (34 - 41) / 41
    front = {k for k, r in table_rows.items() if r.get("front")}
    assert front == {("fmnist", "no guidance"), ("fmnist", "PAG"), ("fmnist", "PAG t=0–0.5"),
                     ("fmnist-cond", "CFG 1.5"), ("fmnist-cond", "CFG 1.5 + PAG"),
                     ("fmnist-cond", "CFG 1.5 + PAG folded")}
    assert table_rows["fmnist", "SEG"]["cost"] is None and table_rows["fmnist", "SEG"]["cost_other_spec"]
    # the target: PAG t=0–0.5 keeps >= 80% on one network only and costs 1.5x, the folded row keeps half: not met
    assert mr.frontier_target(list(table_rows.values())) == []
    fds["fmnist", "PAG t=0–0.5"] = [(33, 2.25), (35, 2.25)]  # 7/8 and 7/8, at 1.05x: met
    rows = _fake(mr, fds)
    ratios["fmnist", "PAG t=0–0.5"] = 1.05
    cost = _cost_file(tmp_path, ratios)
    md = mr._frontier_section(mr.TABLES[-1], cost_path=cost, plot=tmp_path / "frontier.png")
    text = "\n".join(md)
    assert "**met** by fmnist: PAG t=0–0.5." in text
    assert "within the target's cost bound, measured: `fmnist` (≤ 1.10×): PAG t=0–0.5 (1.05); `fmnist-cond` " \
           "(≤ 1.05×): CFG 1.5 + PAG folded (1.02)." in text
    assert (tmp_path / "frontier.png").stat().st_size > 0 and "![FD against measured cost" in text
    line = next(x for x in md if x.startswith("| fmnist | PAG t=0–0.5 "))
    assert "| 1,2 | 34.000 ± 1.000 | 2.250 ± 0.000 | -17.1% | -43.8% | 88% / 88% | 1.05 | ★ |" in line
    assert "Cost measured 2026-12-02T01:00:00+00:00" in text and "load average 2.5 on 2 CPUs" in text
    # the 10,000-sample lines: the front's points and their references, one per seed set, each parsing back
    commands = [x for x in md if x.startswith("pagkit eval")]
    assert len(commands) == 2 * 6 and all("--num-samples 10000" in c for c in commands)
    keys = [mr._configs(c)[1][0].key for c in commands]
    assert "fmnist_pag_s0.5_Lup.0.attentions.1_t0-0.5_ddim20_n10000_seed1" in keys
    assert "fmnist-cond_cfg+pag_w1.5_s0.5_Lup.0.attentions.1_foldtrue_ddim20_n10000_seed2" in keys
    table1 = {c.key for cmd in mr.TABLES[0]["commands"] for c in mr._configs(cmd)[1]}
    assert "fmnist_pag_s0.5_Lup.0.attentions.1_ddim20_n10000_seed1" in keys and \
        "fmnist_pag_s0.5_Lup.0.attentions.1_ddim20_n10000_seed1" in table1  # the full method's row is table 1's
    assert all(shlex.split(c)[0] == "pagkit" for c in commands)


def test_the_target_not_met_is_a_finding(tmp_path, monkeypatch):
    mr = _make_results()
    fds = {("fmnist", "no guidance"): [(40, 4), (40, 4)], ("fmnist", "PAG"): [(32, 2), (32, 2)],
           ("fmnist", "PAG cache=4"): [(38, 3.8), (38, 3.8)]}
    rows = _fake(mr, fds)
    monkeypatch.setattr(mr, "_read_row", lambda out, key: rows.get(key))
    cost = _cost_file(tmp_path, {("fmnist", "no guidance"): 1.0, ("fmnist", "PAG"): 2.0,
                                 ("fmnist", "PAG cache=4"): 1.3})
    text = "\n".join(mr._frontier_section(mr.TABLES[-1], cost_path=cost, plot=tmp_path / "f.png"))
    assert "**not met** by any variant measured (finding)." in text
    assert "`fmnist` (≤ 1.10×): **none**: whatever their FD, no variant can meet the target there" in text


def test_change_and_share_use_the_seed_sets_the_point_its_baseline_and_full_method_all_have():
    mr = _make_results()
    fds = {("fmnist", "no guidance"): [(40, 4), (60, 4)], ("fmnist", "PAG"): [(32, 2), (52, 2)],
           ("fmnist", "PAG cache=2"): [(36, 3), (56, 3)]}
    rows = _fake(mr, fds)
    del rows["fmnist_none_ddim20_n2000_seed2"]  # the baseline has seed set 1 only
    points = mr._frontier_points(mr.TABLES[-1])
    got = {r["point"]["name"]: r for r in mr.frontier_rows(points, rows, {}) if r["point"]["model"] == "fmnist"}
    cached = got["PAG cache=2"]
    assert cached["fd"]["fd"] == (46.0, 10.0)  # its own FD: both seed sets
    assert cached["change"]["fd"] == 100 * (36 - 40) / 40 and cached["share"] == {"fd": 0.5, "fd_b": 0.5}
    assert "front" not in cached  # no cost measured: no front
