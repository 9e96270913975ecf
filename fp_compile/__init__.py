"""fp_compile: FlashPrefill sparse prefill attention as a torch.compile / torch.export pass."""

from .config import FlashPrefillConfig
from . import ops  # noqa: F401  (registers torch.ops.fp_compile.*)
from .api import BlockSelection, flash_prefill, select_blocks
from .accuracy import calibrate
from .explain import explain
from .stats import reset_stats, stats
from .passes.report import RewriteReport
from .passes.sdpa_rewrite import rewrite_sdpa
from .export import apply_flashprefill
from .backend import make_backend

__all__ = ["FlashPrefillConfig", "BlockSelection", "flash_prefill", "select_blocks", "calibrate",
           "explain", "stats", "reset_stats", "rewrite_sdpa", "RewriteReport", "apply_flashprefill",
           "make_backend"]
__version__ = "0.1.0"
