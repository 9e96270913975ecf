"""fp_compile: FlashPrefill sparse prefill attention as a torch.compile / torch.export pass."""

from .config import FlashPrefillConfig
from . import ops  # noqa: F401  (registers torch.ops.fp_compile.*)
from .api import BlockSelection, flash_prefill, select_blocks

__all__ = ["FlashPrefillConfig", "BlockSelection", "flash_prefill", "select_blocks"]
__version__ = "0.1.0"
