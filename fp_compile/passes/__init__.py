"""The SDPA -> flash_prefill rewrite: the pass and the pieces it is made of.

The pass itself is ``fp_compile.passes.sdpa_rewrite.rewrite_sdpa`` (also ``fp_compile.rewrite_sdpa``);
it is not imported here because it builds calls of the op and so imports ``fp_compile.ops``, which
imports this package's eligibility rules.

``sdpa_rewrite`` (the pass), ``eligibility`` (one rule set for the pass and the eager API),
``gqa_fold`` (k/v head repeats), ``causal_mask`` (proving an attn_mask causal), ``layers``
(layer numbers across graph breaks), ``report`` and ``fx_utils`` (shared predicates).
"""

from .eligibility import check_inputs, sdpa_skip_reason
from .layers import layer_numbers
from .report import RewriteReport, Rewritten, Skipped


__all__ = ["RewriteReport", "Rewritten", "Skipped", "sdpa_skip_reason",
           "check_inputs", "layer_numbers"]
