"""pagkit tune: the successive-halving plan keeps to its budget, a killed tune resumes to the same preset, a planted
best setting is found, presets load back as the same terms (sample, attach, from_preset), and bad input fails in
one line before any sampling. Tiny UNet + tiny random classifiers, 2 steps, shards of 4 (as tests/test_evaluate.py)."""
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline

import pagkit
from pagkit import io
from pagkit.cli import main
from pagkit.evaluate import EvalConfig, Sweep
from pagkit.tune import Tune, make_plan, rung_sizes


# 3 sites x 2 scales = 6 settings: rungs of 6 and 2 (η = 3); with shards of 4 the minimum budget is
# 4·(7·1 + 3·2 + 2·3) = 76 samples, and 100 gives rung 0 at 4, rung 1 at 12 samples, the confirmation 24 each
SPACE = dict(layers=[["down.1"], ["down.2"], ["mid"]], scales=[1.0, 2.0], intervals=[(0.0, 1.0)], shard_size=4,
             steps=2)


def _tune(assets, out, budget=100, **kw):
    options = dict(SPACE, classifier=str(assets / "classifier"), classifier_b=str(assets / "classifier-b"),
                   num_real=200, progress=False)
    options.update(kw)
    return Tune(str(assets / "model"), "pag", Path(out), budget, **options)


def _generated_samples(out: Path) -> int:
    """Samples in distinct shard files (a shard reused by the next rung is a hard link or a copy of one)."""
    seen, total = set(), 0
    for path in sorted(out.rglob("shards/*/*.safetensors")):
        images = io.load_tensors(path)["images"]
        key = (path.stat().st_ino, path.stat().st_dev) if path.stat().st_nlink > 1 else path
        if key not in seen:
            seen.add(key)
            total += len(images)
    return total


def test_the_plan_keeps_to_the_budget_and_says_the_minimum():
    for settings, budget, eta, shard in [(6, 100, 3, 4), (56, 13550, 3, 50), (28, 100000, 3, 50), (10, 999, 2, 7),
                                         (1, 10, 3, 1), (3, 40, 3, 5)]:
        plan = make_plan(settings, budget, eta=eta, shard_size=shard)
        assert plan == make_plan(settings, budget, eta=eta, shard_size=shard)  # a pure function
        assert plan.cost <= budget and budget - plan.cost < 2 * shard  # all of it, up to whole shards
        sizes = [n for n, _ in plan.rungs]
        assert sizes == rung_sizes(settings, eta) and sizes[-1] <= eta
        assert all(b == -(-a // eta) for a, b in zip(sizes, sizes[1:]))  # ⌈n/η⌉ go on
        samples = [m for _, m in plan.rungs]
        assert samples[0] % shard == 0 and all(b == a * eta for a, b in zip(samples, samples[1:]))
        assert plan.confirm_samples >= samples[-1] and plan.confirm_samples % shard == 0
        # the cost is counted by hand: each rung's settings and no guidance, beyond the previous rung's samples
        before, cost = 0, 0
        for n, m in plan.rungs:
            cost, before = cost + (n + 1) * (m - before), m
        assert plan.cost == cost + 2 * plan.confirm_samples
    assert make_plan(6, 76, shard_size=4).cost == 76
    with pytest.raises(ValueError, match="budget 75 samples is too small for 6 settings .*the minimum is 76 samples"):
        make_plan(6, 75, shard_size=4)


def test_a_tune_generates_exactly_its_plan_and_writes_its_outputs(assets, tmp_path):
    tune = _tune(assets, tmp_path / "t")
    plan = tune.plan()
    assert [(n, m) for n, m in plan.rungs] == [(6, 4), (2, 12)] and plan.confirm_samples == 24
    preset = tune.run()
    assert _generated_samples(tmp_path / "t") == plan.cost == 100
    for name in ("preset.json", "tune.md", "finalists.png", "rung0/results.md", "confirm/results.json"):
        assert (tmp_path / "t" / name).is_file(), name
    assert preset["method"] == "pag" and preset["family"] == "unet" and preset["model_class"] == "UNet2DModel"
    assert preset["model"] == str(assets / "model") and preset["search"]["cost_samples"] == 100
    # the evidence: every setting of every rung, and no guidance, with its score and sample count
    evidence = preset["evidence"]
    assert [(e["rung"], e["samples"]) for e in evidence].count((0, 4)) == 7
    assert [(e["rung"], e["samples"]) for e in evidence].count((1, 12)) == 3
    rung0 = {e["spec"]: e for e in evidence if e["rung"] == 0}
    kept = sorted((e for e in rung0.values() if e["spec"] != "none"), key=lambda e: e["score"])[:2]
    assert {e["spec"] for e in evidence if e["rung"] == 1} == {"none"} | {e["spec"] for e in kept}
    rung1 = [e for e in evidence if e["rung"] == 1 and e["spec"] != "none"]
    assert preset["spec"] == min(rung1, key=lambda e: e["score"])["spec"]
    # the scores are the sweeps' own FD on the primary network, fd_b beside them
    result = io.read_json(next((tmp_path / "t" / "rung1" / "results").glob("*pag*.json")))
    row = next(e for e in rung1 if e["key"] == result["key"])
    assert row["score"] == result["metrics"]["fd"] and row["fd_b"] == result["metrics"]["fd_b"]
    c = preset["confirmation"]
    assert c["seed_set"] == 1 and c["samples"] == 24 and c["spec"] == preset["spec"]
    assert {"none", "tuned", "none_b", "tuned_b", "change_pct", "change_b_pct", "confirmed"} <= set(c)
    # forward-pass equivalents: 2 steps, PAG adds a row at each
    assert row["forward_equivalents"] == 4 and rung0["none"]["forward_equivalents"] == 2
    fwd = sum(e["forward_equivalents"] * (e["samples"] - (4 if e["rung"] else 0)) for e in evidence) + 24 * (2 + 4)
    assert preset["search"]["cost_forward_equivalents"] == fwd
    md = (tmp_path / "t" / "tune.md").read_text()
    assert preset["spec"] in md and "forward-pass equivalents" in md and "Confirmation" in md


class Killed(Exception):
    pass


def test_a_killed_tune_resumes_to_the_same_preset_recomputing_nothing(assets, tmp_path, monkeypatch):
    straight = _tune(assets, tmp_path / "straight").run()
    plain, made = Sweep.make_shard, []

    def make_shard(self, config, k):
        if len(made) == kill_after:
            raise Killed()
        made.append((config.key, k))
        return plain(self, config, k)

    monkeypatch.setattr(Sweep, "make_shard", make_shard)
    kill_after = 9  # in rung 1, after its first new shard
    with pytest.raises(Killed):
        _tune(assets, tmp_path / "resumed").run()
    first = list(made)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").rglob("*.safetensors")}
    kill_after, made[:] = None, []
    resumed = _tune(assets, tmp_path / "resumed").run()
    assert not set(made) & set(first)  # nothing made twice
    assert len(first) + len(made) == 100 // 4  # every shard of the plan, once
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert resumed == straight
    made[:] = []
    assert _tune(assets, tmp_path / "resumed").run() == straight and made == []  # finished: nothing at all


def _planted_score(assets, tmp_path, planted: EvalConfig, samples: int) -> str:
    """A --score callable whose best setting is known: the squared distance to ``planted``'s own samples (the
    same noise for every setting, so the planted one scores exactly 0, every other one more)."""
    sweep = Sweep(tmp_path / "target", [planted], shard_size=4, progress=False)
    for k in range(sweep.num_shards(planted)):
        sweep.make_shard(planted, k)
    target = torch.cat([io.load_tensors(sweep.shard_path(planted, k))["images"]
                        for k in range(sweep.num_shards(planted))])
    io.save_tensors(tmp_path / "target.safetensors", {"images": target})
    module = tmp_path / "planted_score.py"
    module.write_text(
        "import torch\nfrom pagkit import io\n"
        f"TARGET = io.load_tensors({str(tmp_path / 'target.safetensors')!r})['images']\n"
        "def score(images):\n"
        "    assert images.min() >= -1 and images.max() <= 1\n"
        "    n = min(len(images), len(TARGET))\n"
        "    return ((images[:n] - TARGET[:n]) ** 2).mean()  # a 0-d tensor is a number too\n")
    return f"{module}:score"


def test_a_planted_best_setting_is_found_through_the_command_line(assets, tmp_path):
    planted = EvalConfig(model=str(assets / "model"), method="pag", scale=2.0, layers=("mid",), steps=2,
                         num_samples=12)
    score = _planted_score(assets, tmp_path, planted, 12)
    out = tmp_path / "t"
    args = ["tune", "--model", str(assets / "model"), "--method", "pag", "--budget", "100", "--layers",
            "down.1;down.2;mid", "--scales", "1,2", "--intervals", "0:1", "--shard-size", "4", "--steps", "2",
            "--score", score, "--out", str(out), "--quiet"]
    assert main(args) == 0
    preset = json.loads((out / "preset.json").read_text())
    assert preset["spec"] == "pag:2,layers=mid+" and preset["metric"] == f"score:{score}"
    planted_rows = [e for e in preset["evidence"] if e["spec"] == "pag:2,layers=mid+"]
    assert [(e["rung"], e["score"]) for e in planted_rows] == [(0, 0.0), (1, 0.0)]
    assert all(e["score"] > 0 for e in preset["evidence"] if e["spec"] != "pag:2,layers=mid+")
    c = preset["confirmation"]  # the spread of a callable: its score on the even and on the odd shards
    assert c["spread"] == "even / odd shards" and len(c["tuned_halves"]) == 2 and "tuned_b" not in c
    assert (out / "finalists.png").is_file() and "lower is better" in (out / "tune.md").read_text()
    # presets: one loader for every method, the same terms as the winner
    terms = pagkit.load_preset(out / "preset.json")
    assert terms == [pagkit.PAG(2.0, layers=["mid"])]  # the spec names the layers even where they are the default
    assert pagkit.PAG.from_preset(out / "preset.json") == pagkit.PAG(2.0, layers=["mid"])
    with pytest.raises(ValueError, match="is a pag preset, not seg"):
        pagkit.SEG.from_preset(out / "preset.json")


@pytest.fixture()
def preset_file(tmp_path):
    path = tmp_path / "preset.json"
    io.write_json(path, {"pagkit_preset": 1, "method": "pag", "spec": "pag:2,layers=mid", "model": "m",
                         "family": "unet", "model_class": "UNet2DModel", "evidence": []})
    return path


def test_presets_go_into_attach_and_sample_and_check_the_family(assets, preset_file, tmp_path, capsys):
    pipe = DDPMPipeline.from_pretrained(assets / "model")
    pipe.set_progress_bar_config(disable=True)

    def run(*guidance):
        with pagkit.attach(pipe, *guidance):
            return pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                        output_type="np").images

    assert (run(pagkit.load_preset(preset_file)) == run(pagkit.PAG(2.0, layers=["mid"]))).all()
    other = tmp_path / "sd3.json"
    io.write_json(other, {**io.read_json(preset_file), "family": "sd3", "model": "sd3.5-medium"})
    with pytest.raises(ValueError, match=r"tuned for sd3.5-medium \(the sd3 family\); this model is UNet2DModel "
                                         r"\(the unet family\)"):
        run(pagkit.load_preset(other))
    with pytest.raises(ValueError, match="tuned for"):
        pagkit.sample(pipe.unet, pipe.scheduler, batch_size=1, num_inference_steps=2,
                      guidance=pagkit.load_preset(other))
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(assets / "model"), "--preset", str(preset_file), "--steps", "2",
                 "--num-images", "2", "--quiet", "--out", str(grid)]) == 0
    assert grid.is_file() and "PAG 2 (layers=mid)" in capsys.readouterr().out
    assert main(["sample", "--model", str(assets / "model"), "--preset", str(other), "--steps", "2",
                 "--num-images", "2", "--quiet", "--out", str(tmp_path / "no.png")]) == 2
    err = capsys.readouterr().err
    assert "tuned for sd3.5-medium (the sd3 family)" in err and err.count("\n") == 1
    assert not (tmp_path / "no.png").exists()


def test_the_search_space_pairs_heads_and_dedupes(assets, tmp_path):
    tune = _tune(assets, tmp_path / "s", layers=[["down.1"], ["down_blocks.1.attentions.0"], ["mid"]], pairs=True,
                 scales=[1.0], heads=True)
    configs = tune.space()
    # down.1 and its full name are one site; the pair down.1+mid joins; heads: all, head 0, head 1 (2 heads each)
    assert [(c.layers, c.options) for c in configs] == [
        (layers, heads) for layers in [("down.1",), ("mid",), ("down.1", "mid")]
        for heads in [(), (("heads", "0"),), (("heads", "1"),)]]
    assert configs[1].terms() == [pagkit.PAG(1.0, layers=["down.1"], heads=[0])]
    default = _tune(assets, tmp_path / "d", layers=None, scales=None, intervals=None).space()
    assert {c.layers for c in default} == {("down.1",), ("down.2",), ("mid",), ("up.0.attentions.0",),
                                           ("up.0.attentions.1",), ("up.1.attentions.0",), ("up.1.attentions.1",)}
    assert {c.scale for c in default} == {0.5, 1.0, 2.0, 3.0} and {(c.start, c.stop) for c in default} == \
        {(0.0, 1.0), (0.0, 0.5)}


def _cli_error(capsys, *args) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_bad_input_fails_in_one_line_before_any_sampling(assets, tmp_path, capsys):
    base = ["tune", "--model", str(assets / "model"), "--layers", "down.1;down.2;mid", "--scales", "1,2",
            "--intervals", "0:1", "--shard-size", "4", "--steps", "2"]
    out = tmp_path / "o"
    assert "the minimum is 76 samples" in _cli_error(capsys, *base, "--method", "pag", "--budget", "75",
                                                      "--out", str(out))
    assert "cannot choose sites for 'cfg'; choose one of pag, seg" in _cli_error(
        capsys, *base, "--method", "cfg", "--budget", "100", "--out", str(out))
    bad_layer = [a if a != "down.1;down.2;mid" else "mid;nowhere" for a in base]
    assert "unknown layer 'nowhere'" in _cli_error(capsys, *bad_layer, "--method", "pag", "--budget", "100",
                                                   "--out", str(out))
    assert "seg has no heads option" in _cli_error(capsys, *base, "--method", "seg", "--heads", "--budget", "100",
                                                   "--out", str(out))
    assert "neutral scale" in _cli_error(capsys, *[a if a != "1,2" else "0,1" for a in base], "--method", "pag",
                                         "--budget", "100", "--out", str(out))
    assert "cannot import no_such_module_xyz" in _cli_error(
        capsys, *base, "--method", "pag", "--budget", "100", "--score", "no_such_module_xyz:f", "--out", str(out))
    module = tmp_path / "words.py"
    module.write_text("def score(images):\n    return 'good'\n")
    assert "must return a number (lower is better), got str" in _cli_error(
        capsys, *base, "--method", "pag", "--budget", "100", "--score", f"{module}:score", "--out", str(out))
    assert "has no callable 'nothing'" in _cli_error(
        capsys, *base, "--method", "pag", "--budget", "100", "--score", f"{module}:nothing", "--out", str(out))
    assert "fresh seed set" in _cli_error(capsys, *base, "--method", "pag", "--budget", "100", "--confirm-seed-set",
                                          "0", "--out", str(out))
    assert not out.exists()  # nothing sampled, nothing written
    # another tune in a folder that holds one
    module.write_text("def score(images):\n    return float(images.mean())\n")
    _tune(assets, tmp_path / "t", score=f"{module}:score").run()
    assert "holds another tune (pag on" in _cli_error(
        capsys, *[a if a != "1,2" else "1,3" for a in base], "--method", "pag", "--budget", "100", "--score",
        f"{module}:score", "--out", str(tmp_path / "t"))
    # presets: not a preset, another method's
    (tmp_path / "junk.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a pagkit preset"):
        pagkit.load_preset(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="is a pag preset, not slg"):
        pagkit.load_preset(tmp_path / "t" / "preset.json", method="slg")
    assert os.path.exists(tmp_path / "t" / "preset.json")


# --- the greedy head search and the pairs of the best sites ------------------------------------------------------


@pytest.fixture(scope="module")
def four_heads(tmp_path_factory):
    """The tiny UNet with 8-channel heads: 4 heads at every attention site (the shipped tiny config has 2)."""
    from diffusers import DDIMScheduler, UNet2DModel

    from pagkit.train import unet_config
    root = tmp_path_factory.mktemp("four-heads")
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**{**unet_config(False, "tiny"), "attention_head_dim": 8}),
                 scheduler=DDIMScheduler()).save_pretrained(root / "model")
    return root / "model"


def _lookup_score(folder: Path, table: list[tuple[EvalConfig, float]], name="lookup", shard=4) -> str:
    """A --score callable that knows the settings it is given: a row's first shard (the same noise for every
    setting, so it names the setting) is looked up among ``table``'s, which score their given value; anything
    else (fresh seeds, the probe) scores 100 + its mean."""
    targets = {}
    for j, (config, _) in enumerate(table):
        config = replace(config, num_samples=shard)
        sweep = Sweep(folder / "targets", [config], shard_size=shard, progress=False)
        if not sweep.shard_path(config, 0).is_file():
            sweep.make_shard(config, 0)
        targets[f"t{j}"] = io.load_tensors(sweep.shard_path(config, 0))["images"]
    io.save_tensors(folder / f"{name}.safetensors", targets)
    module = folder / f"{name}.py"
    module.write_text(
        "import torch\nfrom pagkit import io\n"
        f"TARGETS = io.load_tensors({str(folder / f'{name}.safetensors')!r})\n"
        f"VALUES = {({f't{j}': v for j, (_, v) in enumerate(table)})!r}\n"
        "def score(images):\n"
        "    for name, target in TARGETS.items():\n"
        f"        if len(images) >= {shard} and torch.equal(images[:{shard}], target):\n"
        "            return VALUES[name]\n"
        "    return 100 + float(images.mean())\n")
    return f"{module}:score"


def _heads_table(model, whole: float):
    """Head sets of PAG s=2 on mid and their planted scores: round 0 keeps {2} (7 < no guidance's 10), round 1
    {0, 2} (5), round 2's best ({0, 2, 3}: 5.2) does not improve, so the search stops at {0, 2}."""
    pag = EvalConfig(model=str(model), method="pag", scale=2.0, layers=("mid",), steps=1, num_samples=2)
    sets = {(2,): 7, (0,): 8, (1,): 9, (3,): 9.5, (0, 2): 5, (1, 2): 6.5, (2, 3): 8, (0, 1, 2): 5.5, (0, 2, 3): 5.2}
    return [(replace(pag, method="none", scale=0.0, layers=()), 10.0), (pag, whole)] + [
        (replace(pag, options=(("heads", "+".join(map(str, s))),)), v) for s, v in sets.items()]


# 1 setting: one rung of 2 samples; 3 rounds of 4, 3, 2 candidates x 2 samples; the confirmation 2 + 2: 26 samples
HEADS = dict(layers=[["mid"]], scales=[2.0], intervals=[(0.0, 1.0)], shard_size=2, steps=1, heads="greedy",
             max_heads=3, progress=False)


@pytest.fixture(scope="module")
def head_tune(four_heads, tmp_path_factory):
    """The planted scores (whole layer 6: the heads win; 4: the whole layer stays) and one straight tune."""
    root = tmp_path_factory.mktemp("head-tune")
    score = _lookup_score(root, _heads_table(four_heads, whole=6.0), shard=2)
    score_whole = _lookup_score(root, _heads_table(four_heads, whole=4.0), name="lookup-whole", shard=2)
    preset = Tune(str(four_heads), "pag", root / "t", 26, score=score, **HEADS).run()
    return dict(root=root, score=score, score_whole=score_whole, out=root / "t", preset=preset)


def test_the_greedy_head_search_finds_the_planted_heads_within_its_budget(four_heads, head_tune, tmp_path):
    plan = make_plan(1, 26, shard_size=2, head_pool=4, max_heads=3)
    assert (plan.rungs, plan.head_rounds, plan.head_cost, plan.confirm_samples, plan.cost) == (
        ((1, 2),), 3, 18, 2, 26)
    with pytest.raises(ValueError, match=r"and one round of the head search \(4 candidates\).*the minimum is 16"):
        make_plan(1, 15, shard_size=2, head_pool=4, max_heads=3)
    assert make_plan(1, 16, shard_size=2, head_pool=4, max_heads=3).head_rounds == 1  # fewer rounds, no error
    preset, out = head_tune["preset"], head_tune["out"]
    assert preset["spec"] == "pag:2,layers=mid+,heads=0+2"
    assert pagkit.load_preset(out / "preset.json") == [pagkit.PAG(2.0, layers=["mid"], heads=[0, 2])]
    rows = [(e["round"], e["spec"].split("heads=")[1], e["score"], e["samples"], e["seed_set"])
            for e in preset["evidence"] if e.get("stage") == "heads"]
    assert rows == [(0, "0", 8, 2, 0), (0, "1", 9, 2, 0), (0, "2", 7, 2, 0), (0, "3", 9.5, 2, 0),
                    (1, "0+2", 5, 2, 0), (1, "1+2", 6.5, 2, 0), (1, "2+3", 8, 2, 0),
                    (2, "0+1+2", 5.5, 2, 0), (2, "0+2+3", 5.2, 2, 0)]
    h = preset["search"]["heads"]
    assert h["heads"] == [0, 2] and h["chosen"] and h["score"] == 5 and h["whole_layer"]["score"] == 6
    assert h["stop"].startswith("round 2: no head improves on heads [0, 2]") and "beat the whole layer" in h["verdict"]
    assert _generated_samples(out) == preset["search"]["cost_samples"] == 26
    assert preset["confirmation"]["spec"] == preset["spec"] and "heads 2" in (out / "tune.md").read_text()
    # where the whole layer scores better (4 < round 0's 7), the preset keeps it and says so; one round
    small = dict(HEADS, max_heads=1)
    assert make_plan(1, 16, shard_size=2, head_pool=4, max_heads=1).cost == 16
    preset = Tune(str(four_heads), "pag", tmp_path / "w", 16, score=head_tune["score_whole"], **small).run()
    h = preset["search"]["heads"]
    assert preset["spec"] == "pag:2,layers=mid+" and h["heads"] == [2] and not h["chosen"]
    assert "do not beat the whole layer" in h["verdict"] and h["stop"] == "1 rounds: --max-heads"
    assert _generated_samples(tmp_path / "w") == preset["search"]["cost_samples"] == 16


def test_a_killed_head_search_resumes_recomputing_nothing(four_heads, head_tune, tmp_path, monkeypatch):
    from pagkit.tune import ScoredSweep
    plain_make, plain_score, made, scored = Sweep.make_shard, ScoredSweep.write_result, [], []

    def make_shard(self, config, k):
        if len(made) == kill_after:
            raise Killed()
        made.append((config.key, k))
        return plain_make(self, config, k)

    def write_result(self, config):
        scored.append(config.key)
        return plain_score(self, config)

    monkeypatch.setattr(Sweep, "make_shard", make_shard)
    monkeypatch.setattr(ScoredSweep, "write_result", write_result)
    kill_after = 7  # the rung's 2 shards, round 0's 4, then one of round 1's
    with pytest.raises(Killed):
        Tune(str(four_heads), "pag", tmp_path / "resumed", 26, score=head_tune["score"], **HEADS).run()
    first, first_scored = list(made), list(scored)
    assert "heads0+2" in first[-1][0] and len(first_scored) == 2 + 4  # the rung and round 0 are scored
    kill_after, made[:], scored[:] = None, [], []
    resumed = Tune(str(four_heads), "pag", tmp_path / "resumed", 26, score=head_tune["score"], **HEADS).run()
    assert not set(made) & set(first) and not set(scored) & set(first_scored)  # nothing made or scored twice
    assert len(first) + len(made) == 26 // 2
    assert resumed == head_tune["preset"]


def test_the_pair_of_the_two_best_sites_joins_rung_1_and_can_win(assets, tmp_path):
    # η = 2: rung 0 keeps down.2 and mid of 3 sites; their pair joins at rung 1 (3 settings, keep 2), and wins
    pag = EvalConfig(model=str(assets / "model"), method="pag", scale=2.0, steps=2, num_samples=4)
    table = [(replace(pag, method="none", scale=0.0), 10.0), (replace(pag, layers=("down.1",)), 9.0),
             (replace(pag, layers=("down.2",)), 5.0), (replace(pag, layers=("mid",)), 6.0),
             (replace(pag, layers=("down.2", "mid")), 3.0)]
    score = _lookup_score(tmp_path, table)
    tune = _tune(assets, tmp_path / "t", budget=92, scales=[2.0], eta=2, pair_best=2, score=score)
    plan = tune.plan()
    # at most 1 pair (1 pair of sites x 1 scale); rung 0: 4 x 4 new, rung 1: 4 x 4 + the pair's 8, rung 2: 3 x 8
    assert (plan.added, plan.rungs, plan.search_cost, plan.confirm_samples, plan.cost) == (
        1, ((3, 4), (3, 8), (2, 16)), 60, 16, 92)
    with pytest.raises(ValueError, match=r"too small for 3 settings \+ at most 1 pairs at rung 1 .*minimum is 92"):
        _tune(assets, tmp_path / "small", budget=91, scales=[2.0], eta=2, pair_best=2, score=score).plan()
    preset = tune.run()
    rung1 = {e["spec"]: e for e in preset["evidence"] if e.get("rung") == 1}
    assert set(rung1) == {"none", "pag:2,layers=down.2+", "pag:2,layers=mid+", "pag:2,layers=down.2+mid"}
    assert rung1["pag:2,layers=down.2+mid"]["origin"] == "a pair of rung 0's best single sites"
    assert rung1["pag:2,layers=down.2+mid"]["new_samples"] == 8 and rung1["pag:2,layers=mid+"]["new_samples"] == 4
    assert preset["spec"] == "pag:2,layers=down.2+mid"
    assert _generated_samples(tmp_path / "t") == preset["search"]["cost_samples"] == 92


def test_bad_head_and_pair_options_fail_in_one_line_before_any_sampling(assets, tmp_path, capsys):
    base = ["tune", "--model", str(assets / "model"), "--layers", "down.1;down.2;mid", "--scales", "1,2",
            "--intervals", "0:1", "--shard-size", "4", "--steps", "2", "--budget", "400"]
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="--max-heads must be a positive integer, got 0"):  # the CLI: argparse's
        _tune(assets, out, heads="greedy", max_heads=0)                                  # (tests/test_bad_input.py)
    assert "seg has no heads option" in _cli_error(capsys, *base, "--method", "seg", "--heads", "greedy",
                                                   "--out", str(out))
    assert "--max-heads bounds the greedy head search" in _cli_error(
        capsys, *base, "--method", "pag", "--max-heads", "2", "--out", str(out))
    assert "0 (off) or >= 2, got 1" in _cli_error(capsys, *base, "--method", "pag", "--pair-best", "1",
                                                   "--out", str(out))
    with pytest.raises(ValueError, match="η .* must be an integer >= 2, got 1"):  # before the pairs' arithmetic
        _tune(assets, out, pair_best=2, eta=1).plan()
    assert "sag acts on one layer, so its sites cannot be paired" in _cli_error(
        capsys, *base, "--method", "sag", "--pair-best", "2", "--out", str(out))
    # 6 settings; one round of 2 heads x the last rung's 2 units: 4·(7 + 3·2 + 2·3 + 2·3) = 100
    small = [a if a != "400" else "99" for a in base]
    err = _cli_error(capsys, *small, "--method", "pag", "--heads", "greedy", "--out", str(out))
    assert "and one round of the head search (2 candidates)" in err and "the minimum is 100 samples" in err
    assert not out.exists()


def test_a_two_process_head_search_equals_one_process(four_heads, head_tune, tmp_path):
    import shutil
    import subprocess
    import sys
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    args = ["tune", "--model", str(four_heads), "--method", "pag", "--budget", "26", "--layers", "mid", "--scales",
            "2", "--intervals", "0:1", "--shard-size", "2", "--steps", "1", "--heads", "greedy", "--max-heads", "3",
            "--score", head_tune["score"], "--threads", "1", "--quiet", "--out", str(tmp_path / "two")]
    result = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29623", "-m", "pagkit.cli", *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "preset.json").read_text()) == head_tune["preset"]
