"""The backend registry as a new user meets it: `pagkit layers` on saved models, and the unknown-family error."""
import pytest

import models
import pagkit
from pagkit.backends import detect
from pagkit.cli import main


def test_layers_prints_sites_and_kinds_of_saved_joint_models(tmp_path, capsys):
    models.flux().save_pretrained(tmp_path / "flux")
    models.sd3(qk_norm="rms_norm", dual_attention_layers=(0,)).save_pretrained(tmp_path / "sd35")
    assert main(["layers", str(tmp_path / "flux")]) == 0
    out = capsys.readouterr().out
    assert "FluxTransformer2DModel (flux backend): 4 attention sites (2 joint, 2 single)" in out
    assert "single_transformer_blocks.1.attn" in out and "single.1" in out and "double.0" in out
    assert main(["layers", str(tmp_path / "sd35")]) == 0
    out = capsys.readouterr().out
    assert "(3 joint, 1 self)" in out and "transformer_blocks.0.attn2" in out


def test_unknown_family_is_one_clear_error_naming_the_supported_ones(tmp_path, capsys):
    vae = models.vae()
    with pytest.raises(ValueError, match="does not know the model family of AutoencoderKL.*UNet2DModel.*"
                                         "SD3Transformer2DModel.*FluxTransformer2DModel.*src/pagkit/backends/"):
        detect(vae)
    with pytest.raises(ValueError, match="AutoencoderKL"):
        pagkit.sample(vae, models.ddim(), guidance=[pagkit.PAG(1.0)], progress_bar=False)
    vae.save_pretrained(tmp_path / "vae")
    assert main(["layers", str(tmp_path / "vae")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "backends/" in err and "Traceback" not in err



def test_flux_bench_runs_tiny_and_reports_the_exact_result_limit():
    from pagkit import bench
    model = bench.flux_shaped_transformer(num_layers=1, num_single_layers=3, attention_head_dim=8,
                                          axes_dims_rope=(2, 2, 4))
    configs, limits = bench.flux_configs(1, side=4, text=3, model=model)
    assert limits == {"PAG(block 1 of 4) pagkit": 0.75, "PAG(block 2 of 4) pagkit": 0.5,
                      "PAG(block 3 of 4) pagkit": 0.25}
    results = bench.run_interleaved(configs, rounds=1, progress=False)
    table = bench.report("tiny", results, ["no guidance"], limits)
    assert "| PAG(block 2 of 4) pagkit |" in table and "limit (n − d)/n" in table


def test_wan_bench_runs_tiny_and_reports_the_exact_result_limit(monkeypatch, capsys):
    from pagkit import bench
    from pagkit.cli import main
    model = bench.wan_shaped_transformer(num_layers=4, num_attention_heads=2, attention_head_dim=8, ffn_dim=16,
                                         freq_dim=16, text_dim=8, in_channels=4, out_channels=4)
    configs, limits = bench.wan_configs(1, latent=(2, 4, 4), text=3, model=model)
    assert limits == {"PAG(block 1 of 4) pagkit": 0.75, "PAG(block 2 of 4) pagkit": 0.5,
                      "PAG(block 3 of 4) pagkit": 0.25}
    results = bench.run_interleaved(configs, rounds=1, progress=False)
    table = bench.report("tiny", results, ["no guidance"], limits)
    assert "| PAG(block 3 of 4) pagkit, no sharing |" in table and "limit (n − d)/n" in table
    tiny = bench.wan_configs
    monkeypatch.setattr(bench, "wan_configs", lambda steps: tiny(steps, latent=(2, 4, 4), text=3, model=model))
    assert main(["bench", "--model", "wan", "--steps", "1", "--rounds", "1"]) in (None, 0)
    assert "Wan-shaped video transformer, PAG on one block at depth d of n" in capsys.readouterr().out


def test_readme_family_table_names_every_registered_backend():
    from pathlib import Path

    from pagkit.backends import BACKENDS
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    table = readme[readme.index("## Model families"):readme.index("## Your own model")]
    for backend in BACKENDS:
        row = next((line for line in table.splitlines() if line.startswith(f"| `{backend.name}.py` |")), None)
        assert row is not None, f"README's family table has no row for backends/{backend.name}.py"
        if backend.name != "generic":
            assert all(f"`{cls}`" in row for cls in backend.model_classes), (backend.name, row)
