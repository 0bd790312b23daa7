"""Property-based tests (hypothesis): random input never raises anything but ValueError/TypeError.

Covered: term construction (every class of ``pagkit.methods.METHODS`` with random field values), ``parse_spec`` on
random text, layer resolution on a tiny UNet with random selections, and schedules (``scale_at``,
``in_interval``). For valid terms, ``parse_spec(format_spec(terms)) == terms``.
"""
import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
from pagkit.layers import resolve_layers, sites
from pagkit.methods import METHODS
from pagkit.spec import format_spec, parse_spec

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ALLOWED = (ValueError, TypeError)
UNET = models.unet2d()
SITES = list(sites(UNET))

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._*", min_size=1, max_size=12)
anything = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=True, allow_infinity=True) | names
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(names, inner, max_size=2),
    max_leaves=6)


def _fields(cls):
    return [f for f in dataclasses.fields(cls) if f.init]


@st.composite
def random_kwargs(draw, cls):
    fields = _fields(cls)
    chosen = draw(st.lists(st.sampled_from(fields), unique=True, max_size=len(fields)))
    kwargs = {f.name: draw(anything) for f in chosen if f.name != "weak_model"}
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(-5, 5) | anything)
    return kwargs


@pytest.mark.parametrize("name", list(METHODS))
@SETTINGS
@given(data=st.data())
def test_constructing_a_term_with_random_fields_raises_only_value_or_type_errors(name, data):
    cls = METHODS[name]
    kwargs = data.draw(random_kwargs(cls))
    try:
        term = cls(**kwargs)
    except ALLOWED:
        return
    repr(term)  # a constructed term can at least describe itself


@SETTINGS
@given(text=st.text(max_size=40) | st.builds(
    lambda m, items: m + ":" + ",".join(items), st.sampled_from(list(METHODS) + ["x", ""]),
    st.lists(st.sampled_from(["1", "nan", "inf", "-1", "layers=mid", "layers=", "start=0.5", "stop=0.2", "rule=apg",
                              "rule=apg(eta=0", "rule=cfgzerostar(x=1)", "sigma=-1", "=", "seed=1.5", "kind=temporal",
                              "perturbation=blur", "heads=0+1", "strength=2", "mode=attention", "tau=0", "scale=1",
                              "weak_model=fmnist-nope", ";", "pag:1"]), max_size=5)))
def test_parse_spec_on_random_text_raises_only_value_or_type_errors(text):
    try:
        terms = parse_spec(text)
    except ALLOWED:
        return
    assert parse_spec(format_spec(terms)) == terms


scale_values = st.floats(0, 10, allow_nan=False).map(lambda v: round(v, 3))  # scales: negative ones are refused
layer_lists = st.lists(st.sampled_from(["mid", "down.1", "down.2", "up.0", "up.1", *SITES]), min_size=1, max_size=3,
                       unique=True)


@st.composite
def valid_terms(draw):
    """Terms of every text-representable method with random, valid field values (lists for list fields)."""
    name = draw(st.sampled_from([n for n in METHODS if n != "autoguidance"]))
    cls = METHODS[name]
    start = draw(st.sampled_from([0.0, 0.1, 0.25, 0.5]))
    kwargs = dict(start=start, stop=draw(st.sampled_from([s for s in (0.3, 0.6, 0.9, 1.0) if s > start])))
    if draw(st.booleans()):
        kwargs["scale_end"] = draw(scale_values)
    fields = {f.name for f in _fields(cls)}
    if "layers" in fields and name in ("pag", "seg", "nag"):
        kwargs["layers"] = draw(layer_lists)
    if "layer" in fields:
        kwargs["layer"] = draw(st.sampled_from(["mid", "down.1"]))
    if "sigma" in fields:
        kwargs["sigma"] = draw(st.sampled_from([math.inf, 1.0, 2.5]))
    if "seed" in fields:
        kwargs["seed"] = draw(st.integers(0, 99))
    if "perturbation" in fields:
        kwargs["perturbation"] = draw(st.sampled_from(["identity", "uniform", "mask", "noise"]))
    return cls(draw(scale_values), **kwargs)


@SETTINGS
@given(terms=st.lists(valid_terms(), min_size=1, max_size=3))
def test_format_then_parse_gives_the_terms_back(terms):
    try:
        from pagkit.methods import check_guidance
        check_guidance(terms)
    except ALLOWED:  # e.g. two terms of a method that may appear once
        return
    assert parse_spec(format_spec(terms)) == terms


selection_items = st.sampled_from(SITES + ["mid", "down", "up", "down.1", "down.2", "up.0", "up.9", "blocks.1",
                                           "down_blocks.*", "*attentions.0", "mid_block", "[", "*", "x", ""]) \
    | names | st.integers() | st.none()


@SETTINGS
@given(selection=selection_items | st.lists(selection_items, max_size=4),
       kind=st.none() | st.sampled_from(["self", "temporal", "diagonal", ""]))
def test_resolving_random_layer_selections_raises_only_value_or_type_errors(selection, kind):
    try:
        chosen = resolve_layers(UNET, selection, kind=kind)
    except ALLOWED:
        return
    assert chosen and chosen == [s for s in SITES if s in chosen]  # sites of the model, in forward order, once


@SETTINGS
@given(term=valid_terms(), progress=st.floats(-1, 2) | st.sampled_from([0.0, 1.0, math.nan, math.inf]))
def test_schedules_act_on_their_interval_only_and_move_linearly(term, progress):
    inside = term.in_interval(progress)
    if isinstance(term, METHODS["slg"]):  # open at both ends, as diffusers' SD3 pipeline: i > N·start, i < N·stop
        assert inside == (term.start < progress < term.stop)
    else:
        assert inside == (term.start <= progress < term.stop)
    scale = term.scale_at(progress)
    assert math.isfinite(scale)
    if not inside:
        assert scale == term.neutral
        return
    end = term.scale if term.scale_end is None else term.scale_end
    assert min(term.scale, end) - 1e-9 <= scale <= max(term.scale, end) + 1e-9
    if term.in_interval(term.start):
        assert term.scale_at(term.start) == float(term.scale)
