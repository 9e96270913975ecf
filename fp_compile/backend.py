"""The ``"flashprefill"`` torch.compile backend: the SDPA rewrite, then Inductor.

Registered by name through the ``torch_dynamo_backends`` entry point in pyproject.toml (not with
``@register_backend``: registering the same name twice makes the first lookup fail)::

    torch.compile(model, backend="flashprefill", options={"alpha": 0.1, "block_size": 64})
    torch.compile(model, backend=fp_compile.make_backend(FlashPrefillConfig(alpha=0.1)))

``options`` are FlashPrefillConfig fields (unknown keys raise ValueError listing the valid ones);
``mode`` maps onto Inductor settings as it does for ``backend="inductor"``. Inductor's and
dynamo's global config are never changed: the mode's settings are passed to ``compile_fx`` as
``config_patches``, which applies them only while compiling.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from .config import FlashPrefillConfig
from .passes import RewriteReport, rewrite_sdpa

_last_report: Optional[RewriteReport] = None


def last_report() -> Optional[RewriteReport]:
    """The RewriteReport of the most recent graph this backend compiled (None before any)."""
    return _last_report


def mode_config_patches(mode: Optional[str]) -> dict[str, Any]:
    """Inductor config patches for a torch.compile ``mode``, as ``backend="inductor"`` uses."""
    if not mode or mode == "default":
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def compile_with_config(gm: torch.fx.GraphModule, example_inputs, config: FlashPrefillConfig,
                        mode: Optional[str] = None) -> Callable:
    """Rewrite ``gm``'s SDPA calls under ``config``, then compile it with Inductor."""
    global _last_report
    patches = mode_config_patches(mode)       # an unknown mode fails before the graph changes
    _last_report = rewrite_sdpa(gm, config)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches)


def flashprefill_backend(gm: torch.fx.GraphModule, example_inputs, *,
                         mode: Optional[str] = None,
                         options: Optional[Mapping[str, Any]] = None) -> Callable:
    """The ``"flashprefill"`` backend: ``options`` are FlashPrefillConfig fields."""
    return compile_with_config(gm, example_inputs, FlashPrefillConfig.from_options(options), mode)


def make_backend(config: FlashPrefillConfig | None = None) -> Callable:
    """A backend bound to ``config``: ``torch.compile(m, backend=make_backend(cfg))``.

    ``options`` given to torch.compile as well override the config's fields.
    """
    config = config or FlashPrefillConfig()
    if not isinstance(config, FlashPrefillConfig):
        raise TypeError(f"make_backend expects a FlashPrefillConfig, got {type(config).__name__}")

    def flashprefill(gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None,
                     options: Optional[Mapping[str, Any]] = None) -> Callable:
        cfg = config
        if options:
            FlashPrefillConfig.from_options(options)    # validates the keys
            cfg = config.replace(**options)
        return compile_with_config(gm, example_inputs, cfg, mode)

    flashprefill.config = config
    return flashprefill
