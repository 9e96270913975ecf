"""Demo, test and benchmark scaffolding: not the op library.

Random-init models (``models``), inputs with planted attention structure (``synthetic``), block
mask pictures (``plotting``), the ``python -m fp_compile demo`` run (``run``), the kernel
benchmark (``bench``), and the trained long-context model: its synthetic tasks (``tasks``), its
training (``train``) and its loading, scoring and demo (``trained``, weights in ``weights/``).
They exist to show and measure the op; the library (``fp_compile`` outside this package) never
imports them, so none of their optional dependencies (transformers, matplotlib, tqdm,
safetensors) is needed to use the op, the pass or the backend.
"""
