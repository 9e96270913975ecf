import dataclasses
import math
import re

import pytest

from fp_compile import FlashPrefillConfig
from fp_compile.config import _BEYOND_PAPER_OFF


@pytest.mark.parametrize("field,value", [
    ("alpha", -0.1), ("alpha", math.nan), ("alpha", 1.5), ("alpha", "0.1"),
    ("block_size", 48), ("block_size", 8), ("block_size", 64.0),
    ("window_blocks", 0), ("sink_blocks", -1), ("last_dense_blocks", -1),
    ("min_seq_len", -5), ("kernel", "cuda"), ("mean_correction", 1),
    ("dense_layers", (-1,)), ("layer_alpha", ((0, 2.0),)),
])
def test_invalid_values_raise_naming_the_field(field, value):
    # the full name, so that "alpha" is not matched by "layer_alpha" or the list of fields
    with pytest.raises(ValueError, match=re.escape(f"FlashPrefillConfig.{field}") + r"(?!\w)"):
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
