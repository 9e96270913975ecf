"""The ``"flashprefill"`` torch.compile backend: the SDPA rewrite, then Inductor.

Registered by name through the ``torch_dynamo_backends`` entry point in pyproject.toml (not with
``@register_backend``: registering the same name twice makes the first lookup fail)::

    torch.compile(model, backend="flashprefill", options={"alpha": 0.1, "block_size": 64})
    torch.compile(model, backend=fp_compile.make_backend(FlashPrefillConfig(alpha=0.1)),
                  mode="reduce-overhead")

``options`` are FlashPrefillConfig fields (unknown keys raise ValueError listing the valid ones).
torch.compile refuses ``mode`` and ``options`` together, so the mode may also be given as the
option ``"mode"`` (``options={"alpha": 0.1, "mode": "reduce-overhead"}``), or the config bound
with ``make_backend`` and ``mode=`` passed as usual. ``mode`` maps onto Inductor settings as it
does for ``backend="inductor"``.
Inductor's and dynamo's global config are never changed: the mode's settings are passed to
``compile_fx`` as ``config_patches``, which applies them only while compiling.

Every graph's ``RewriteReport`` is kept (a model with graph breaks, or ``generate()``'s prefill
and decode graphs, compile several): ``last_report()`` merges them; ``reports()`` lists them;
``reset_reports()`` starts afresh. A ``make_backend`` backend also keeps its own list
(``backend.reports``, ``backend.last_report()``), so one backend per model gives per-model
reports.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Optional

import torch

from .config import FlashPrefillConfig
from .passes.report import RewriteReport
from .passes.sdpa_rewrite import rewrite_sdpa


# Reports of every graph compiled by fp_compile's backends, oldest first.
_reports: list[RewriteReport] = []
_warned: set[str] = set()

GRAD_WARNING = (
    "fp_compile: {n} SDPA call(s) left dense because their inputs require grad (the op has no "
    "backward). For inference, run the compiled model under torch.no_grad() or "
    "torch.inference_mode().")


def reports() -> list[RewriteReport]:
    """The RewriteReport of every graph fp_compile's backends compiled, oldest first."""
    return list(_reports)


def last_report() -> Optional[RewriteReport]:
    """Every graph's report merged into one (None before any compile; ``reset_reports()``).

    Entries keep the layer numbers of the pass; ``graphs`` counts the graphs merged.
    """
    return RewriteReport.merge(_reports) if _reports else None


def reset_reports() -> None:
    """Forget the reports and the named backend's once-only warnings."""
    _reports.clear()
    _warned.clear()


def mode_config_patches(mode: Optional[str]) -> dict[str, Any]:
    """Inductor config patches for a torch.compile ``mode``, as ``backend="inductor"`` uses."""
    if not mode or mode == "default":
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def compile_with_config(gm: torch.fx.GraphModule, example_inputs, config: FlashPrefillConfig,
                        mode: Optional[str] = None, *,
                        report_list: Optional[list] = None,
                        warned: Optional[set] = None) -> Callable:
    """Rewrite ``gm``'s SDPA calls under ``config``, then compile it with Inductor.

    The report joins the module's list (``last_report()``) and ``report_list`` if given (a
    ``make_backend`` backend's own); a graph whose SDPA calls stay dense because they need
    gradients warns once per ``warned`` set.
    """
    patches = mode_config_patches(mode)       # an unknown mode fails before the graph changes
    report = rewrite_sdpa(gm, config)
    from torch._inductor.compile_fx import compile_fx

    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    # Recorded only once Inductor accepted the graph: dynamo may abandon a trace while it is
    # compiled (with dynamic=True the first trace of a frame is redone), and that graph's
    # report would describe calls that never run.
    _reports.append(report)
    if report_list is not None:
        report_list.append(report)
    _warn_grad_once(report, _warned if warned is None else warned)
    return compiled


def _warn_grad_once(report: RewriteReport, warned: set) -> None:
    n = sum(1 for s in report.skipped if s.reason == "requires grad")
    if n and "grad" not in warned:
        warned.add("grad")
        warnings.warn(GRAD_WARNING.format(n=n), stacklevel=3)


def _split_mode(mode: Optional[str], options: Optional[Mapping[str, Any]]):
    """(mode, config options): ``options["mode"]`` stands for torch.compile's ``mode``."""
    options = dict(options or {})
    if "mode" in options:
        if mode is not None and mode != options["mode"]:
            raise ValueError(f"flashprefill: mode={mode!r} and options['mode']="
                             f"{options['mode']!r} disagree")
        mode = options.pop("mode")
    return mode, options


def flashprefill_backend(gm: torch.fx.GraphModule, example_inputs, *,
                         mode: Optional[str] = None,
                         options: Optional[Mapping[str, Any]] = None) -> Callable:
    """The ``"flashprefill"`` backend: ``options`` are FlashPrefillConfig fields (+ ``mode``)."""
    mode, options = _split_mode(mode, options)
    return compile_with_config(gm, example_inputs, FlashPrefillConfig.from_options(options), mode)


def make_backend(config: FlashPrefillConfig | None = None) -> Callable:
    """A backend bound to ``config``: ``torch.compile(m, backend=make_backend(cfg), mode=...)``.

    ``options`` given to torch.compile as well override the config's fields. The backend keeps
    the reports of the graphs it compiled in ``backend.reports`` and warns once (not once per
    graph) when calls stay dense because they need gradients.
    """
    config = config or FlashPrefillConfig()
    if not isinstance(config, FlashPrefillConfig):
        raise TypeError(f"make_backend expects a FlashPrefillConfig, got {type(config).__name__}")
    own_reports: list[RewriteReport] = []
    warned: set = set()

    def flashprefill(gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None,
                     options: Optional[Mapping[str, Any]] = None) -> Callable:
        mode, options = _split_mode(mode, options)
        cfg = config
        if options:
            FlashPrefillConfig.from_options(options)    # validates the keys
            cfg = config.replace(**options)
        return compile_with_config(gm, example_inputs, cfg, mode, report_list=own_reports,
                                   warned=warned)

    flashprefill.config = config
    flashprefill.reports = own_reports
    flashprefill.last_report = lambda: RewriteReport.merge(own_reports) if own_reports else None
    return flashprefill
