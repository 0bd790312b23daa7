import pytest

import models
import pagkit


def test_blocks_1_never_selects_blocks_10_or_11():
    dit = models.dit()  # 12 blocks: diffusers' regex "blocks.1" would hit blocks.1, .10, .11
    assert pagkit.resolve_layers(dit, "blocks.1") == ["transformer_blocks.1.attn1"]
    assert pagkit.resolve_layers(dit, ["blocks.10", "blocks.1"]) == ["transformer_blocks.1.attn1",
                                                                     "transformer_blocks.10.attn1"]


def test_exact_names_globs_and_aliases():
    unet = models.unet2d()
    assert pagkit.resolve_layers(unet, "mid") == ["mid_block.attentions.0"]
    assert pagkit.resolve_layers(unet, "down.1") == ["down_blocks.1.attentions.0"]
    assert pagkit.resolve_layers(unet, "down_blocks.2.attentions.0") == ["down_blocks.2.attentions.0"]
    assert pagkit.resolve_layers(unet, "up_blocks.*.attentions.1") == ["up_blocks.0.attentions.1",
                                                                      "up_blocks.1.attentions.1"]
    assert pagkit.resolve_layers(unet, "up.1.attentions.0") == ["up_blocks.1.attentions.0"]


def test_alias_counts():
    counts = {alias: len(names) for alias, names in pagkit.aliases(models.unet2d()).items()}
    assert counts == {"mid": 1, "down": 2, "up": 4, "down.1": 1, "down.2": 1, "up.0": 2, "up.1": 2}
    sdxl = {alias: len(names) for alias, names in pagkit.aliases(models.sdxl_unet()).items()}
    assert sdxl == {"mid": 2, "down": 2, "up": 4, "down.1": 2, "up.0": 4}
    dit = pagkit.aliases(models.dit())
    assert len(dit) == 12 and all(len(v) == 1 for v in dit.values())


def test_layers_lists_self_attention_in_forward_order_with_grids():
    infos = pagkit.layers(models.sd_unet())
    assert [i.name for i in infos] == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                                       "mid_block.attentions.0.transformer_blocks.0.attn1",
                                       "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                                       "up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
    assert [i.grid for i in infos] == [(16, 16), (8, 8), (16, 16), (16, 16)]
    assert all(not i.name.endswith("attn2") for i in infos)  # cross-attention is never listed
    assert {i.grid for i in pagkit.layers(models.pixart())} == {(4, 4)}


def test_unknown_layer_error_names_nearest_valid_names():
    with pytest.raises(ValueError) as err:
        pagkit.resolve_layers(models.unet2d(), "mid_blok")
    message = str(err.value)
    assert "unknown layer 'mid_blok'" in message
    nearest = message.split("nearest valid names: ")[1].split(".")[0:3]
    assert "mid_block.attentions.0" in ".".join(nearest) and "mid" in message
    assert "pagkit layers" in message
    with pytest.raises(ValueError, match="nearest valid names"):
        pagkit.resolve_layers(models.dit(), "blocks.12")


def test_cross_attention_is_refused():
    with pytest.raises(ValueError, match="cross-attention layer"):
        pagkit.resolve_layers(models.sd_unet(), "mid_block.attentions.0.transformer_blocks.0.attn2")


def test_bad_guidance_arguments_fail_clearly():
    with pytest.raises(ValueError, match="PAG scale must be a finite number, got nan"):
        pagkit.PAG(float("nan"))
    with pytest.raises(ValueError, match="unknown perturbation 'blurr'; choose one of"):
        pagkit.PAG(3.0, perturbation="blurr")
    with pytest.raises(ValueError, match="0 <= start < stop <= 1"):
        pagkit.PAG(3.0, start=0.6, stop=0.5)
    with pytest.raises(ValueError, match="SEG sigma must be a positive number"):
        pagkit.SEG(3.0, sigma=float("nan"))
    with pytest.raises(ValueError, match="SAG reads one attention map; layer 'up' selects 4"):
        pagkit.sample(models.unet2d(), models.ddim(), guidance=[pagkit.SAG(1.0, layer="up")], progress_bar=False)
