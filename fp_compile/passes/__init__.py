"""The SDPA -> flash_prefill rewrite: the pass and the pieces it is made of.

``sdpa_rewrite`` (the pass), ``eligibility`` (one rule set for the pass and the eager API),
``gqa_fold`` (k/v head repeats), ``causal_mask`` (proving an attn_mask causal), ``layers``
(layer numbers across graph breaks), ``report`` and ``fx_utils`` (shared predicates).
"""

from .eligibility import check_inputs, sdpa_skip_reason
from .layers import layer_numbers
from .report import RewriteReport, Rewritten, Skipped
from .sdpa_rewrite import rewrite_sdpa

__all__ = ["rewrite_sdpa", "RewriteReport", "Rewritten", "Skipped", "sdpa_skip_reason",
           "check_inputs", "layer_numbers"]
