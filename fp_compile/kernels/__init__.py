"""FlashPrefill's Triton kernels, one per module, each with the plain-torch reference that
defines what it computes:

* ``block_means``: mean key (and value) of every key block;
* ``pattern_search``: the block selection (scores, threshold, compaction), its device
  functions in ``search_tiles``;
  ``search_reference``: its plain-torch reference, the whole selection rule (spans included);
* ``block_sparse_attention``: online-softmax attention over the kept blocks (its reference in
  ``block_sparse_reference``); ``block_sparse_attention_tma``: variants of it for tuning on
  Hopper (TMA descriptors, folded scale, lazy rescale), none the default;
* ``fp8_quant`` and ``block_sparse_attention_fp8``: per-block e4m3 quantisation and the FP8
  block-sparse attention over the same selection (``FlashPrefillConfig.fp8_attention``), each
  with its reference;
* ``vertical_slash``: the heavy column / diagonal detector (Triton probe + reference), its
  shared probe pieces and "skew" variant in ``vertical_slash_skew``;
* ``utils``: sizes, dtypes and selection layouts shared by all of them.

Which of them runs for a given call is decided in ``fp_compile.dispatch``.
"""
