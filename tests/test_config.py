"""FlashPrefillConfig: validation naming the field, frozen and hashable, round trips through
replace/from_options, paper_rule, per-layer settings.

The property tests walk ``dataclasses.fields(FlashPrefillConfig)`` and ``_BEYOND_PAPER_OFF``, so a
new field is drawn without editing them: by its type (bool, int, float, str) for wrong-typed
values, and with its default (and, for a beyond-the-paper option, its "off" value) as valid ones
until it gets a strategy of its own in ``_VALID`` / ``_INVALID``.
"""

import dataclasses
import math
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fp_compile import FlashPrefillConfig
from fp_compile.config import _BEYOND_PAPER_OFF, _KERNELS

FIELDS = {f.name: f for f in dataclasses.fields(FlashPrefillConfig)}
DEFAULTS = FlashPrefillConfig()
fast = settings(max_examples=50, deadline=None)

_unit = st.floats(0.0, 1.0)
_outside_unit = st.floats(max_value=0.0, exclude_max=True) | st.floats(min_value=1.0,
                                                                       exclude_min=True)
_layers = st.lists(st.integers(0, 80), max_size=4)
_layer_alphas = st.dictionaries(st.integers(0, 80), _unit, max_size=4)

# Valid values of the fields these tests know in detail.
_VALID = {
    "block_size": st.integers(4, 11).map(lambda e: 2 ** e),
    "alpha": _unit,
    "sink_blocks": st.integers(0, 64),
    "window_blocks": st.integers(1, 64),
    "last_dense_blocks": st.integers(0, 64),
    "min_seq_len": st.integers(0, 2 ** 20),
    "kernel": st.sampled_from(_KERNELS),
    "vs_threshold": _unit,
    "vs_rows": st.integers(0, 128),
    "search_stride": st.sampled_from([1, 2, 4, 8]),
    "slash_probe": st.floats(0.0, 64.0) | st.integers(0, 64),
    # users pass lists and dicts (torch.compile options); the config stores tuples
    "dense_layers": _layers | _layers.map(tuple),
    "layer_alpha": _layer_alphas | _layer_alphas.map(lambda d: tuple(d.items())),
}

# Invalid values, beyond the wrong types drawn for every field from its annotation.
_INVALID = {
    "block_size": st.integers(-64, 4096).filter(lambda n: n < 16 or n & (n - 1)),
    "alpha": _outside_unit | st.just(math.nan),
    "sink_blocks": st.integers(max_value=-1),
    "window_blocks": st.integers(max_value=0),
    "last_dense_blocks": st.integers(max_value=-1),
    "min_seq_len": st.integers(max_value=-1),
    "kernel": st.text(max_size=10).filter(lambda s: s not in _KERNELS),
    "vs_threshold": _outside_unit | st.just(math.nan),
    "vs_rows": st.integers(max_value=-1) | st.integers(min_value=129),
    "search_stride": st.integers(-4, 64).filter(lambda n: n not in (1, 2, 4, 8)),
    "slash_probe": st.floats(max_value=0.0, exclude_max=True)
    | st.sampled_from([math.nan, math.inf, -math.inf]),
    "dense_layers": st.tuples(_layers, st.integers(max_value=-1) | st.sampled_from([True, "0", 1.0]))
    .map(lambda t: (*t[0], t[1])),
    "layer_alpha": st.tuples(_layer_alphas, st.integers(0, 80), _outside_unit)
    .map(lambda t: {**t[0], t[1]: t[2]})
    | st.tuples(st.integers(max_value=-1), _unit).map(lambda pair: (pair,)),
}

_WRONG_TYPE = {
    "bool": st.sampled_from([0, 1, "yes", None]),
    "int": st.sampled_from([2.0, "8", None, True]),
    "float": st.sampled_from(["0.1", None, True, math.nan]),
    "str": st.sampled_from([None, 3, b"auto"]),
}


def valid_values(name):
    if name in _VALID:
        return _VALID[name]
    if FIELDS[name].type == "bool":
        return st.booleans()
    known = [getattr(DEFAULTS, name)]
    if name in _BEYOND_PAPER_OFF:
        known.append(_BEYOND_PAPER_OFF[name])
    return st.sampled_from(known)


def invalid_values(name):
    strategies = [s for s in (_INVALID.get(name), _WRONG_TYPE.get(FIELDS[name].type))
                  if s is not None]
    return st.one_of(strategies) if strategies else None


INVALID_FIELDS = sorted(name for name in FIELDS if invalid_values(name) is not None)


def stored(name, value):
    """What the config keeps for a valid ``value`` (lists and dicts become tuples)."""
    if name == "dense_layers":
        return tuple(value)
    if name == "layer_alpha":
        return tuple(value.items()) if isinstance(value, dict) else tuple(value)
    return value


@st.composite
def valid_kwargs(draw, names=tuple(FIELDS)):
    chosen = draw(st.lists(st.sampled_from(sorted(names)), unique=True)) if names else []
    return {name: draw(valid_values(name)) for name in chosen}


def names_field(name):
    """A ValueError message naming ``FlashPrefillConfig.<name>`` (and not a longer name)."""
    return re.escape(f"FlashPrefillConfig.{name}") + r"(?!\w)"


@fast
@given(valid_kwargs())
@example({"block_size": 16, "window_blocks": 1, "alpha": 0.0})
@example({"alpha": 1.0, "min_seq_len": 0, "dense_layers": [], "layer_alpha": {}})
def test_valid_values_construct_and_round_trip(kwargs):
    cfg = FlashPrefillConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(cfg, name) == stored(name, value), name
    for name in FIELDS.keys() - kwargs.keys():
        assert getattr(cfg, name) == getattr(DEFAULTS, name), name
    assert DEFAULTS.replace(**kwargs) == cfg
    assert FlashPrefillConfig.from_options(kwargs) == cfg
    every_field = {name: getattr(cfg, name) for name in FIELDS}
    assert FlashPrefillConfig.from_options(every_field) == cfg
    assert cfg.replace(**every_field) == cfg and cfg.replace() == cfg
    assert hash(FlashPrefillConfig(**every_field)) == hash(cfg)


@fast
@given(st.data(), st.sampled_from(INVALID_FIELDS), valid_kwargs())
def test_invalid_value_raises_value_error_naming_the_field(data, name, others):
    value = data.draw(invalid_values(name), label=name)
    kwargs = {**others, name: value}
    with pytest.raises(ValueError, match=names_field(name)):
        FlashPrefillConfig(**kwargs)
    with pytest.raises(ValueError, match=names_field(name)):
        DEFAULTS.replace(**{name: value})
    with pytest.raises(ValueError, match=names_field(name)):
        FlashPrefillConfig.from_options(kwargs)


@fast
@given(valid_kwargs(names=tuple(FIELDS.keys() - _BEYOND_PAPER_OFF.keys())))
def test_paper_rule_keeps_every_beyond_paper_option_off(overrides):
    cfg = FlashPrefillConfig.paper_rule(**overrides)
    for name, off in _BEYOND_PAPER_OFF.items():
        assert getattr(cfg, name) == off, name
    for name, value in overrides.items():
        assert getattr(cfg, name) == stored(name, value), name


def test_beyond_paper_options_are_fields():
    assert _BEYOND_PAPER_OFF.keys() <= FIELDS.keys()


@pytest.mark.parametrize("field,value", [
    ("alpha", -0.1), ("alpha", math.nan), ("alpha", 1.5), ("alpha", "0.1"),
    ("block_size", 48), ("block_size", 8), ("block_size", 64.0),
    ("window_blocks", 0), ("sink_blocks", -1), ("last_dense_blocks", -1),
    ("min_seq_len", -5), ("kernel", "cuda"), ("mean_correction", 1),
    ("dense_layers", (-1,)), ("layer_alpha", ((0, 2.0),)),
])
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=names_field(field)):
        FlashPrefillConfig(**{field: value})


# Found by the property tests' first draft: a non-iterable or malformed per-layer setting raised
# TypeError, or a ValueError from int()/float() or tuple unpacking that did not name the field,
# and a fractional layer was truncated.
@pytest.mark.parametrize("field,value", [
    ("dense_layers", 5), ("layer_alpha", 5), ("layer_alpha", ((0,),)),
    ("layer_alpha", ((0, "x"),)), ("layer_alpha", (("a", 0.1),)), ("layer_alpha", ((1.5, 0.1),)),
])
def test_malformed_per_layer_settings_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=names_field(field)):
        FlashPrefillConfig(**{field: value})


def test_defaults_are_valid_and_frozen():
    cfg = FlashPrefillConfig()
    assert cfg.block_size == 128 and cfg.window_blocks >= 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.alpha = 0.5


def test_paper_rule_turns_every_beyond_paper_option_off():
    cfg = FlashPrefillConfig.paper_rule(alpha=0.18)
    assert cfg.alpha == 0.18
    for name, off in _BEYOND_PAPER_OFF.items():
        assert getattr(cfg, name) == off, name


def test_from_options_rejects_unknown_keys_and_lists_valid_ones():
    assert FlashPrefillConfig.from_options({"alpha": 0.1}).alpha == 0.1
    with pytest.raises(ValueError, match=r"unknown flashprefill option\(s\) \['alhpa'\]; "
                                         r"valid options are \[.*'alpha'"):
        FlashPrefillConfig.from_options({"alhpa": 0.1})


def test_layer_overrides_accept_mappings_and_resolve_per_layer():
    cfg = FlashPrefillConfig(dense_layers=[0, 1], layer_alpha={3: 0.05})
    assert cfg.dense_layers == (0, 1) and cfg.layer_alpha == ((3, 0.05),)
    assert cfg.for_layer(0) is None
    assert cfg.for_layer(3).alpha == 0.05
    assert cfg.for_layer(2).alpha == cfg.alpha
    hash(cfg)


def test_options_summary_names_the_detectors_settings():
    assert FlashPrefillConfig.paper_rule().options_summary() == ""
    on = FlashPrefillConfig.paper_rule(vertical_slash=True)
    assert on.options_summary() == "vertical_slash"
    assert on.replace(vs_rows=32, vs_threshold=0.005).options_summary() == (
        "vertical_slash(vs_threshold=0.005, vs_rows=32)")
    assert FlashPrefillConfig().options_summary() == (
        "vertical_slash, mass_floor=0.8, dense_above=0.6")
    assert FlashPrefillConfig(vs_rows=0).options_summary() == (
        "vertical_slash(vs_rows=0), mass_floor=0.8, dense_above=0.6")
    assert FlashPrefillConfig(vertical_slash=False, vs_rows=32).options_summary() == (
        "mass_floor=0.8, dense_above=0.6")
    assert FlashPrefillConfig.paper_rule(search_stride=2).options_summary() == "search_stride=2"


def test_a_call_with_a_span_runs_without_the_span_dropped_options():
    cfg = FlashPrefillConfig(alpha=0.2)
    assert cfg.vertical_slash and cfg.vs_rows == 16
    assert cfg.for_span() == cfg.replace(vertical_slash=False)
    strided = cfg.replace(search_stride=4)
    assert strided.for_span() == cfg.replace(vertical_slash=False)
    off = FlashPrefillConfig.paper_rule()
    assert off.for_span() is off
    assert off.search_stride == 1 == FlashPrefillConfig().search_stride
