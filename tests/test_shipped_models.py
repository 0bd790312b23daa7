"""The models shipped inside the package: they load, match their cards, and run in diffusers' own pipelines."""
import json

import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline

import pagkit
from pagkit.load import load_model, load_scheduler, shipped_models


WEAK_MISSING = pytest.mark.skipif("fmnist-weak" not in shipped_models(),
                                  reason="fmnist-weak is missing from this copy (see pagkit.load.TO_TRAIN)")


@pytest.mark.parametrize("name", ["fmnist", "fmnist-cond", pytest.param("fmnist-weak", marks=WEAK_MISSING)])
def test_shipped_model_loads_and_matches_its_card(name):
    folder = shipped_models()[name]
    card = json.loads((folder / "card.json").read_text())
    model = load_model(name)
    loaded = json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))
    assert loaded == card["unet_config"]
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    assert card["conditional"] == (name == "fmnist-cond") == bool(model.config.num_class_embeds)
    assert card["images_seen"] == card["steps"] * card["batch_size"]
    for key in ("training_command", "training_seconds", "final_loss", "data_md5"):
        assert card[key]
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 20e6
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("pipeline_cls", [DDIMPipeline, DDPMPipeline])
def test_shipped_unconditional_model_runs_in_diffusers_pipelines_with_attach(pipeline_cls):
    pipe = pipeline_cls.from_pretrained(shipped_models()["fmnist"])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=3, output_type="np")
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    with pagkit.attach(pipe, pagkit.PAG(3.0, layers="down.1")):
        guided = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert plain.shape == guided.shape == (2, 32, 32, 1)
    assert abs(plain - guided).max() > 1e-3


@WEAK_MISSING
def test_shipped_weak_model_is_the_25pct_snapshot_and_guides_fmnist():
    card = json.loads((shipped_models()["fmnist-weak"] / "card.json").read_text())
    assert card["snapshot"] == {"name": "ema-25pct", "step": 1500, "fraction": 0.25, "max_steps": 6000}
    model, weak = load_model("fmnist"), load_model("fmnist-weak")
    assert card["unet_config"] == json.loads((shipped_models()["fmnist"] / "card.json").read_text())["unet_config"]
    scheduler = load_scheduler("fmnist", "ddim")
    kw = dict(batch_size=2, num_inference_steps=3, progress_bar=False)
    plain = pagkit.sample(model, scheduler, generator=torch.Generator().manual_seed(0), **kw)
    guided = pagkit.sample(model, scheduler, guidance=[pagkit.AutoGuidance(2.0, weak)],
                           generator=torch.Generator().manual_seed(0), **kw)
    assert (guided - plain).abs().max() > 1e-3


def test_shipped_presets_are_tunes_of_their_model_and_load_by_name():
    """models/<model>/presets/<method>.json is pagkit tune's preset.json for that model, and "<model>:<method>" names
    it wherever a preset file is taken."""
    from pagkit.methods import METHODS
    from pagkit.presets import shipped_presets
    from pagkit.spec import parse_spec
    presets = shipped_presets()
    assert "fmnist:pag" in presets
    for name, path in presets.items():
        model, method = name.split(":")
        record = json.loads(path.read_text())
        assert (record["model"], record["method"], record["family"]) == (model, method, "unet")
        assert record["confirmation"]["confirmed"] and record["evidence"]
        assert record["search"]["cost_samples"] <= record["search"]["budget"]
        terms = pagkit.load_preset(name)
        assert terms == parse_spec(record["spec"]) and type(terms[0]) is METHODS[method]
        assert terms[0].tuned_for["model"] == model
    assert pagkit.PAG.from_preset("fmnist:pag") == pagkit.load_preset("fmnist:pag")[0]
    with pytest.raises(ValueError, match="is a pag preset, not seg"):
        pagkit.load_preset("fmnist:pag", method="seg")
    with pytest.raises(FileNotFoundError, match=r"no shipped preset of that name \(shipped: fmnist:pag"):
        pagkit.load_preset("fmnist:nope")



def test_results_table_1_reports_the_shipped_presets():
    """docs/make_results.py writes the tuned settings literally (so re-tuning cannot orphan table 1's rows); they
    must be what the shipped presets hold."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))
    import make_results
    for method, (layers, scale) in (("pag", make_results.TUNED_PAG), ("seg", make_results.TUNED_SEG)):
        term, = pagkit.load_preset(f"fmnist:{method}")
        assert (term.layers, term.scale) == ([layers], float(scale))
    assert make_results.TUNED_SEG == make_results.MAP9_SEG  # so table 1's SEG rows are the tuned preset's too


def test_the_demo_samples_the_shipped_presets_on_fmnist_and_its_strip_on_their_sites(tmp_path, capsys):
    """./run demo's own arguments (read from the script): fmnist's rows are its presets and the strip runs on the PAG
    preset's sites; fmnist-cond, for which they were not tuned, keeps its CFG rows."""
    import shlex
    from pathlib import Path
    from pagkit.cli import main
    run = (Path(__file__).resolve().parents[1] / "run").read_text()
    line = next(l for l in run.splitlines() if l.strip().startswith("demo)"))
    argv = shlex.split(line.split("pagkit sample", 1)[1].split('"$@"')[0])
    assert main(["sample", *argv, "--strip", "0,1", "--steps", "2", "--num-images", "2", "--quiet",
                 "--out", str(tmp_path / "demo.png")]) == 0
    printed = [" ".join(l.split()) for l in capsys.readouterr().out.splitlines()]
    sites = ",".join(pagkit.load_preset("fmnist:pag")[0].layers)
    for name in (n for n in argv[1::2] if ":" in n):
        assert any(l.startswith("fmnist |") and f"preset {name}" in l for l in printed), name
    assert any(l.startswith("fmnist |") and f"strip: PAG s=1 {sites}" in l for l in printed)
    assert any(l.startswith("fmnist-cond | CFG w=1.5 + PAG") for l in printed)
    assert not any(l.startswith("fmnist-cond |") and "preset" in l for l in printed)
