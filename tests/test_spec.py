"""Guidance as text (pagkit.spec): every method's fields, read and written back; the CLI rows built from it."""
import dataclasses
import math
import re
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline
from PIL import Image

import models
import pagkit
from pagkit.cli import build_parser, eval_configs, main
from pagkit.methods import METHODS
from pagkit.spec import format_spec, label, parse_spec, parse_term


def _default_term(cls):
    try:
        return cls()
    except (TypeError, ValueError):  # a method that needs an argument (AutoGuidance's weak model)
        return None


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_reads_back_what_it_writes(name):
    term = _default_term(METHODS[name])
    if term is None:
        pytest.skip(f"{name} needs an object argument")
    assert parse_spec(format_spec([term])) == [term]
    assert parse_term(name) == term  # a bare name is the method's defaults
    assert label([term]).startswith(type(term).__name__)


def test_values_are_read_by_each_field_s_type():
    assert parse_spec("pag:1,layers=mid+down.2,start=0.25,scale_end=2") == [
        pagkit.PAG(1.0, layers=["mid", "down.2"], start=0.25, scale_end=2.0)]
    assert parse_spec("pag:1, layers=mid") == [pagkit.PAG(1.0, layers="mid")]
    assert parse_spec("slg:2,layers=7+8") == [pagkit.SLG(2.0, layers=[7, 8])]
    assert parse_spec("seg:1,sigma=inf") == [pagkit.SEG(1.0, sigma=math.inf)]
    assert parse_spec("sag:0.5,kernel_size=7,layer=down.1") == [pagkit.SAG(0.5, kernel_size=7, layer="down.1")]
    assert parse_spec(" cfg:3 ; pag:0.5 ") == [pagkit.CFG(3.0), pagkit.PAG(0.5)]
    assert parse_spec("none") == [] and parse_spec("") == []
    assert format_spec([pagkit.CFG(3.0), pagkit.PAG(0.5, layers=["mid", "down.2"])]) == \
        "cfg:3; pag:0.5,layers=mid+down.2"
    assert label([pagkit.CFG(3.0), pagkit.PAG(0.5)]) == "CFG 3 + PAG 0.5 (layers=mid)"


def test_combination_rules_are_written_in_parentheses():
    terms = parse_spec("pag:2,layers=mid,rule=apg(eta=0.5,norm_threshold=4,momentum=-0.5); "
                       "cfg:3,rule=cfg-zero-star(zero_init_steps=1)")
    assert terms == [pagkit.PAG(2.0, layers="mid", rule=pagkit.APG(eta=0.5, norm_threshold=4.0, momentum=-0.5)),
                     pagkit.CFG(3.0, rule=pagkit.CFGZeroStar(zero_init_steps=1))]
    assert parse_spec(format_spec(terms)) == terms
    assert parse_spec("seg:1,rule=apg") == [pagkit.SEG(1.0, rule=pagkit.APG())]
    for text, message in [("pag:1,rule=apgg", "unknown combination rule 'apgg'; choose one of apg"),
                          ("pag:1,rule=apg(eta=0", "unbalanced '('"),
                          ("pag:1,rule=apg(et=0)", "APG has no option 'et'; its options: eta")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_spec(text)


@pytest.mark.parametrize("text, message", [
    ("pgg:1", "unknown guidance method 'pgg'; choose one of cfg, pag"),
    ("pag:1,layer=mid", "PAG has no option 'layer'; its options: scale, start"),
    ("pag:x", "PAG scale (float) is a number, got 'x'"),
    ("pag:1,2", "'2' needs a key (key=value)"),
    ("pag:1,scale=2", "scale given twice"),
    ("cfg:2;cfg:3", "at most one CFG term"),
    ("sag:1,kernel_size=2.5", "SAG kernel_size (int) is an integer, got '2.5'"),
    ("seg:1,per_frame=maybe", "is true or false, got 'maybe'"),
    ("pag:1,start=0.8,stop=0.2", "interval must satisfy 0 <= start < stop <= 1"),
    (":1", "starts with its method's name"),
])
def test_bad_specs_name_the_problem_and_the_choices(text, message):
    with pytest.raises(ValueError) as err:
        parse_spec(text)
    assert message in str(err.value)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    DDPMPipeline(unet=models.unet2d(), scheduler=DDIMScheduler()).save_pretrained(path)
    return path


def test_sample_rows_come_from_guidance_specs(model_dir, tmp_path, capsys):
    out_png = tmp_path / "grid.png"
    assert main(["sample", "--model", str(model_dir), "--steps", "2", "--num-images", "2", "--quiet",
                 "--guidance", "pag:1,layers=down.1", "--guidance", "slg:1,layers=mid,start=0,stop=1",
                 "--out", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "no guidance" in printed and "PAG 1 (layers=down.1)" in printed
    assert "SLG 1 (start=0, stop=1, layers=mid)" in printed
    assert "SEG" not in printed  # the user's rows replace the default ones
    assert Image.open(out_png).size[1] == 3 * (16 * 3 + 2) + 2


def test_a_model_argument_is_given_by_name_or_folder(model_dir):
    term = parse_term(f"autoguidance:1.5,weak_model={model_dir}")
    assert isinstance(term.module, torch.nn.Module) and term.scale == 1.5
    assert parse_spec(format_spec([term])) == [term]
    given = pagkit.AutoGuidance(1.5, weak_model=term.module)
    with pytest.raises(ValueError, match="weak_model is a UNet2DModel, which has no text form"):
        format_spec([given])


@pytest.mark.parametrize("argv, message", [
    (["sample", "--guidance", "pag:1,layers=mid_blok"], "unknown layer 'mid_blok'"),
    (["sample", "--guidance", "tpx:1"], "unknown guidance method 'tpx'"),
    (["sample", "--guidance", "cfg:2; pag:1"], "CFG needs a class-conditional model (with a null class)"),
    (["eval", "--methods", "sag", "--options", "kernel_sise=7", "--out", "unused"],
     "option 'kernel_sise' is a field of none of the methods sag"),
])
def test_bad_guidance_on_the_command_line_is_one_line(argv, message, model_dir):
    if argv[0] == "sample":
        argv = [*argv, "--model", str(model_dir)]
    result = subprocess.run([sys.executable, "-m", "pagkit.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_eval_takes_any_method_with_the_axes_its_fields_have():
    args = build_parser().parse_args(["eval", "--methods", "none,sag,cfg+seg", "--scales", "1,2",
                                      "--cfg-scales", "1.5", "--seg-sigmas", "inf,10", "--options",
                                      "kernel_size=7", "--out", "unused"])
    configs = eval_configs(args)
    sag = [c for c in configs if c.method == "sag"]
    assert [c.key for c in sag] == ["fmnist_sag_s1_Lmid_kernel_size7_ddim20_n2000_seed0",
                                    "fmnist_sag_s2_Lmid_kernel_size7_ddim20_n2000_seed0"]
    assert sag[0].terms() == [pagkit.SAG(1.0, layer="mid", kernel_size=7)]
    seg = [c for c in configs if c.method == "cfg+seg"]
    assert [(c.scale, c.sigma, c.options) for c in seg] == [(1, math.inf, ()), (1, 10, ()), (2, math.inf, ()),
                                                            (2, 10, ())]
    from pagkit.defaults import DEFAULT_PAG_LAYERS  # eval's --layers default
    assert seg[1].terms() == [pagkit.CFG(1.5), pagkit.SEG(1.0, sigma=10.0, layers=DEFAULT_PAG_LAYERS)]


def test_eval_sweeps_repeated_options_and_keeps_a_rules_commas():
    """``--options`` repeated: one row per option set, the rows they share (none) once; a rule's options keep the
    commas inside its parentheses."""
    args = build_parser().parse_args(["eval", "--methods", "none,pag", "--scales", "1", "--layers", "mid",
                                      "--options", "rule=apg(eta=0,momentum=-0.5)", "--options", "rule=apg(eta=1)",
                                      "--out", "unused"])
    configs = eval_configs(args)
    assert [c.method for c in configs] == ["none", "pag", "pag"]
    assert [c.terms() for c in configs[1:]] == [[pagkit.PAG(1.0, layers=["mid"], rule=pagkit.APG(eta=0.0, momentum=-0.5))],
                                                [pagkit.PAG(1.0, layers=["mid"], rule=pagkit.APG(eta=1.0))]]
    assert len({c.key for c in configs}) == 3


def test_results_of_a_row_with_options_say_them(tmp_path):
    from pagkit.evaluate import EvalConfig, _config_dict, flatten
    plain = EvalConfig("fmnist", "sag", scale=1.0, layers=("mid",))
    assert "options" not in _config_dict(plain)  # results written before options existed read the same
    row = dataclasses.replace(plain, options=(("kernel_size", "7"),))
    metrics = {"fd": 1.0, "kid": 0.1}
    flat = flatten([{"config": _config_dict(row), "metrics": metrics}])
    assert (flat[0]["method"], flat[0]["options"]) == ("sag", "kernel_size=7")
