"""``explain``: what the flashprefill backend would do to a model, from one run on example inputs."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import FlashPrefillConfig

log = logging.getLogger("fp_compile")


def explain(model: Any, *example_inputs: Any, config: FlashPrefillConfig | None = None,
            dynamic: bool | None = None, **example_kwargs: Any):
    """Compile ``model`` with the flashprefill rewrite, run it once on the example inputs and
    return the ``RewriteReport``: which SDPA calls were rewritten and, for the others, why not.

    The model runs exactly once (dynamo traces, the pass rewrites, the rewritten graph runs;
    there is no separate tracing run), with stats collected: ``report.stats`` holds what each
    rewritten call did in that run (density, lowest estimated kept mass and heads run dense per
    layer and head, as ``fp_compile.stats()`` rows), and ``str(report)`` shows them. Inductor is
    not invoked: the rewritten FX graph runs as is.
    Gradient mode matters as it does for the backend: call under ``torch.no_grad()`` to see what
    inference would do. ``model`` is an ``nn.Module`` or any callable dynamo can trace.
    """
    from .passes.sdpa_rewrite import rewrite_sdpa

    from .stats import StatsTable, stats

    config = (config or FlashPrefillConfig()).replace(collect_stats=True)
    reports: list = []
    first_row = len(stats())

    def capture(gm: torch.fx.GraphModule, inputs):
        reports.append(rewrite_sdpa(gm, config))
        return gm.forward

    compiled = torch.compile(model, backend=capture, dynamic=dynamic)
    compiled(*example_inputs, **example_kwargs)
    if not reports:
        raise RuntimeError("explain: dynamo captured no graph from the model (is it already "
                           "compiled, or does it run under torch.compiler.disable?)")
    from .passes.report import RewriteReport

    report = reports[0] if len(reports) == 1 else RewriteReport.merge(reports)
    report.stats = StatsTable(stats().rows[first_row:])
    log.info("flashprefill explain: %d SDPA call(s) rewritten, %d left dense, in %d graph(s)",
             len(report.rewritten), len(report.skipped), len(reports))
    return report
