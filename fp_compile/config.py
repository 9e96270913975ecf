"""FlashPrefillConfig: every hyperparameter of the FlashPrefill op in one frozen dataclass.

Defaults follow the paper (arXiv 2603.06199) except where a measured improvement says otherwise;
``FlashPrefillConfig.paper_rule()`` always gives the paper's selection exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

_KERNELS = ("auto", "triton", "reference")

# Options that go beyond the paper. paper_rule() switches every one of them off, so new
# beyond-the-paper fields must be registered here with their "off" value.
_BEYOND_PAPER_OFF: dict[str, Any] = {
    "mean_correction": False,
    "gqa_shared": False,
    "vertical_slash": False,
    "mass_floor": 0.0,
    "dense_above": 1.0,
    "fp8_attention": False,
    "slash_probe": 0.0,
    "search_stride": 1,
}

# The vertical/slash detector's settings (``options_summary`` names those not at their default).
_VS_SETTINGS = ("vs_threshold", "vs_rows")

# Options a call with a span (padded batch, cached prefix, cache buffer) does not support: the
# op refuses them there (``spans``) and the pass leaves such calls dense, naming the option.
SPAN_UNSUPPORTED = ("mean_correction", "fp8_attention", "slash_probe")
# Options a call with a span runs without (``FlashPrefillConfig.for_span``): the vertical/slash
# probe reads the prompt's last rows as one unpadded sequence. It is on by default, so refusing
# it would leave every padded or cached-prefix call dense. A strided search scores every row of
# such a call (the subset of a partly valid block's rows could be empty). The call's stats row
# and ``explain`` show the options it ran with.
SPAN_DROPPED = ("vertical_slash", "search_stride")

SEARCH_STRIDES = (1, 2, 4, 8)


@dataclass(frozen=True)
class FlashPrefillConfig:
    """Hyperparameters of FlashPrefill sparse prefill attention.

    Attributes:
        block_size: tokens per query/key block (power of two, >= 16).
        alpha: dynamic threshold; key block j is kept for query block i when
            ``score_ij >= alpha * max_j score_ij``. 0 keeps every causal block (dense).
        sink_blocks: the first key blocks that every query block always keeps.
        window_blocks: key blocks ending at the diagonal (diagonal included) always kept (>= 1).
        last_dense_blocks: the last query blocks that keep every causal key block.
        min_seq_len: below this sequence length the op runs dense SDPA (cuDNN on Hopper). On
            an H200 (benchmarks/RESULTS.md, runs 16-17) the search and the guards' decision cost
            0.17-0.24 ms of cuDNN's 0.89 ms at 8K tokens, so structure-less prompts there ran at
            0.77-0.85x cuDNN: below 16K tokens the op does not try.
        kernel: "auto" (Triton on CUDA, reference elsewhere), "triton" or "reference".
        mean_correction: FlashPrefill V2's zero-order correction: each skipped key block fully
            before the query block enters the softmax as one pseudo-token.
        gqa_shared: query heads of one kv group share one kept set (the union).
        vertical_slash: add the key blocks of heavy single-key columns and heavy diagonals
            (slash lines), found from the exact attention of the probe rows (``vs_rows``), to
            every query block they reach: what mean-pooled block scores dilute. On by default:
            with the prompt's last 16 rows it lowered the summed error vs dense by 10-15%
            against the paper's rule, no case worse, for +0.2 to +2 points of density and
            6-7% of the op's time at 32K-128K on an H200 (benchmarks/RESULTS.md, run 82).
            Calls with a span run without it (``SPAN_DROPPED``).
        vs_threshold: a column or diagonal is heavy when it holds at least this share of the
            probe rows' attention mass (diagonals: beyond what columns explain).
        vs_rows: the vertical/slash probe's rows: n in 1..128 the prompt's last n rows
            (default 16), 0 the last query block's (a probe of 16 rows costs an eighth of a
            full block's dots).
        mass_floor: the mass guard. The normalised block scores estimate each query block's
            attention mass per key block; a row whose kept estimated mass falls below this
            keeps more blocks, down a ladder of lower thresholds (alpha, alpha/4, alpha/16,
            alpha/64, then every causal block): no sort. 0 is the paper's rule.
        dense_above: a kv group (the query heads that share one k/v head) whose kept density is
            above this runs dense attention (cuDNN on Hopper) instead of block-sparse, where
            sparsity no longer pays. Decided on the host after the search (one small device to
            host copy), except while a CUDA graph is being captured, when every group runs
            block-sparse. 1 never runs dense.
        fp8_attention: the block-sparse attention runs in FP8 (e4m3): q, k and v are quantised
            per block (one fp32 scale per head and selection block) and both dots (q k^T and
            p v) take e4m3 operands with fp32 accumulation; the softmax stays fp32 and the
            output keeps q's dtype. The search, short prompts and the dense fallback stay in
            q's dtype. Needs float16/bfloat16 inputs, head dim <= 128, block_size in
            (32, 64, 128), no mean_correction, and calls without a span (key mask, query
            positions, S_q < S_kv); otherwise the op raises ValueError (checked per call, as
            the fields are independent of each other here). On CPU (or
            kernel="reference") the plain-torch reference of the same arithmetic runs. Off by
            default: see benchmarks/bench_fp8.py for its speed and error.
        slash_probe: kappa of the slash probe (``kernels/slash_probe.py``); 0 is off. Exact
            logits of 64 query rows spread over the prompt's second half, each row centred,
            the median over the rows per diagonal offset: an offset at least kappa median
            absolute deviations above its head's median is a slash line, and its key blocks are
            added to every query block it reaches (diagonals only, OR-ed with
            ``vertical_slash``'s). Not supported with a span (ValueError). Off by default
            until measured on the GPU (benchmarks/bench_guards.py --slash-probe).
        search_stride: the search scores each query block with every n-th of its rows (1, 2,
            4 or 8; 1 is the paper's: every row), so its dots and exponentials shrink n-fold.
            It changes the selection. On an H200 at 128K (benchmarks/RESULTS.md, run 91) n = 2
            took the search from 1.54 to 1.12 ms, and on the benchmark's planted inputs kept
            the kept sets (Jaccard >= 0.997 against the full search). On the shipped trained
            model's layers at 32K it gave 0.91-0.998, half of them under the 0.98 the project
            asks of a default, so it is off (1). Needs block_size / n >= 16 (checked per call:
            ValueError). Calls with a span score every row (``SPAN_DROPPED``).
        dense_layers: layers that stay dense, numbered as the pass numbers them (the model's
            layer index, e.g. ``layers.3.self_attn`` is 3; else the SDPA call's order in its
            graph).
        layer_alpha: per-layer alpha overrides, as ``((layer, alpha), ...)``.
        collect_stats: record per-layer, per-head density of every prefill (off: no cost).
    """

    block_size: int = 128
    alpha: float = 0.12
    sink_blocks: int = 2
    window_blocks: int = 4
    last_dense_blocks: int = 2
    min_seq_len: int = 16384
    kernel: str = "auto"
    mean_correction: bool = False
    gqa_shared: bool = False
    vertical_slash: bool = True
    vs_threshold: float = 0.015
    vs_rows: int = 16
    mass_floor: float = 0.8
    dense_above: float = 0.6
    fp8_attention: bool = False
    slash_probe: float = 0.0
    search_stride: int = 1
    dense_layers: tuple[int, ...] = ()
    layer_alpha: tuple[tuple[int, float], ...] = ()
    collect_stats: bool = False

    def __post_init__(self) -> None:
        def _int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"FlashPrefillConfig.{name} must be an int, got {value!r}")
            if value < minimum:
                raise ValueError(f"FlashPrefillConfig.{name} must be >= {minimum}, got {value}")

        _int("block_size", 16)
        if self.block_size & (self.block_size - 1):
            raise ValueError(
                f"FlashPrefillConfig.block_size must be a power of two, got {self.block_size}"
            )
        _int("sink_blocks", 0)
        _int("window_blocks", 1)
        _int("last_dense_blocks", 0)
        _int("min_seq_len", 0)
        _int("vs_rows", 0)
        if self.vs_rows > 128:
            raise ValueError(f"FlashPrefillConfig.vs_rows must be <= 128, got {self.vs_rows}")
        _int("search_stride", 1)
        if self.search_stride not in SEARCH_STRIDES:
            raise ValueError(f"FlashPrefillConfig.search_stride must be one of {SEARCH_STRIDES}, "
                             f"got {self.search_stride}")
        _check_alpha("alpha", self.alpha)
        if self.kernel not in _KERNELS:
            raise ValueError(
                f"FlashPrefillConfig.kernel must be one of {_KERNELS}, got {self.kernel!r}"
            )
        _check_alpha("vs_threshold", self.vs_threshold)
        _check_alpha("mass_floor", self.mass_floor)
        _check_alpha("dense_above", self.dense_above)
        for name in ("mean_correction", "gqa_shared", "collect_stats", "vertical_slash",
                     "fp8_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FlashPrefillConfig.{name} must be a bool")
        object.__setattr__(self, "slash_probe", _check_kappa("slash_probe", self.slash_probe))
        # Accept lists / dicts from users (and torch.compile options) but store hashable tuples.
        object.__setattr__(self, "dense_layers", _layers(self.dense_layers))
        object.__setattr__(self, "layer_alpha", _layer_alphas(self.layer_alpha))

    @classmethod
    def paper_rule(cls, **overrides: Any) -> "FlashPrefillConfig":
        """The config that reproduces the paper's selection exactly (beyond-paper options off)."""
        values = dict(_BEYOND_PAPER_OFF)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "FlashPrefillConfig":
        """Build a config from ``torch.compile(..., options={...})``; unknown keys raise."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown flashprefill option(s) {unknown}; valid options are {valid}"
            )
        return cls(**options)

    def options_summary(self) -> str:
        """The beyond-paper options this config turns on, e.g. "vertical_slash,
        mass_floor=0.8, dense_above=0.6" (the defaults; "" for the paper's rule); stats rows
        and ``explain`` show it. The vertical/slash detector's settings follow it where they
        are not the defaults, e.g. "vertical_slash(vs_threshold=0.005, vs_rows=32)"."""
        parts = []
        for name, off in _BEYOND_PAPER_OFF.items():
            value = getattr(self, name)
            if value != off:
                parts.append(name if isinstance(value, bool) else f"{name}={value:g}")
        if self.vertical_slash:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            detail = [f"{name}={getattr(self, name):g}" for name in _VS_SETTINGS
                      if getattr(self, name) != defaults[name]]
            if detail:
                parts[parts.index("vertical_slash")] = f"vertical_slash({', '.join(detail)})"
        return ", ".join(parts)

    def replace(self, **changes: Any) -> "FlashPrefillConfig":
        return dataclasses.replace(self, **changes)

    def for_span(self) -> "FlashPrefillConfig":
        """The config a call with a span runs with: ``SPAN_DROPPED`` options off."""
        dropped = {name: _BEYOND_PAPER_OFF[name] for name in SPAN_DROPPED
                   if getattr(self, name) != _BEYOND_PAPER_OFF[name]}
        return self.replace(**dropped) if dropped else self

    def for_layer(self, layer: int) -> "FlashPrefillConfig | None":
        """The config for the ``layer``-th SDPA call, or None when that layer stays dense."""
        if layer in self.dense_layers:
            return None
        for index, a in self.layer_alpha:
            if index == layer:
                return self.replace(alpha=a)
        return self


def _is_layer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _layers(value: Any) -> tuple[int, ...]:
    """dense_layers as a tuple of layer numbers (ints >= 0)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError("FlashPrefillConfig.dense_layers must be a sequence of layer numbers, "
                         f"got {value!r}")
    layers = tuple(value)
    for layer in layers:
        if not _is_layer(layer):
            raise ValueError(f"FlashPrefillConfig.dense_layers entries must be ints >= 0, got "
                             f"{layer!r}")
    return layers


def _layer_alphas(value: Any) -> tuple[tuple[int, float], ...]:
    """layer_alpha ({layer: alpha} or ((layer, alpha), ...)) as a tuple of pairs."""
    if isinstance(value, Mapping):
        value = value.items()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError("FlashPrefillConfig.layer_alpha must be a mapping or a sequence of "
                         f"(layer, alpha) pairs, got {value!r}")
    pairs = []
    for pair in value:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Iterable) or len(
                tuple(pair)) != 2:
            raise ValueError(f"FlashPrefillConfig.layer_alpha entries must be (layer, alpha) "
                             f"pairs, got {pair!r}")
        layer, a = tuple(pair)
        if not _is_layer(layer):
            raise ValueError(f"FlashPrefillConfig.layer_alpha layer must be an int >= 0, got "
                             f"{layer!r}")
        _check_alpha("layer_alpha", a)
        pairs.append((layer, float(a)))
    return tuple(pairs)


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"FlashPrefillConfig.{name} must be a float, got {value!r}")
    if math.isnan(value) or value < 0 or value > 1:
        raise ValueError(f"FlashPrefillConfig.{name} must be in [0, 1], got {value}")


def _check_kappa(name: str, value: Any) -> float:
    """A finite float >= 0 (ints accepted), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"FlashPrefillConfig.{name} must be a float, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"FlashPrefillConfig.{name} must be finite and >= 0 (0: off), got "
                         f"{value}")
    return float(value)
