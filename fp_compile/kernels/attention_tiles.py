"""Device functions shared by the block-sparse attention kernels (``block_sparse_attention``,
its Hopper variants in ``block_sparse_attention_tma`` and the FP8 kernel): how a query tile's
kept list splits into the blocks before the diagonal and the diagonal itself. The tests
compare each kernel with the plain-torch references (``block_sparse_reference``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _kept_split(idx_row, sin, num, i):
    """A kept list (``num`` ascending entries at ``idx_row``, stride ``sin``) of query block i,
    split at the diagonal: (the number of entries j < i, whether block i itself is kept).

    A causal selection (every entry <= i, as the searches write) is split with one load, of
    the last entry: only it can be the diagonal. Entries past the diagonal (j > i, which no
    search writes) are walked back over and never attended. (The kernels used to walk back
    over every entry >= i and read the first of them again, three dependent loads; the one-load
    split timed the same on the H200, RESULTS.md run 58, and each kernel had its own copy.)
    """
    last = tl.load(idx_row + (num - 1) * sin, mask=num > 0, other=-1)
    n = num
    while last > i:
        n -= 1
        last = tl.load(idx_row + (n - 1) * sin, mask=n > 0, other=-1)
    diag = last == i
    return n - diag.to(tl.int32), diag
