"""The op stack below the public API (:mod:`srntt_core.swap`), top to bottom:

- :mod:`.library` registers the custom ops ``srntt::patch_match``, ``srntt::feature_swap`` and
  their backward (autograd, fake kernels for ``torch.compile``) and checks their arguments;
- :mod:`.dispatch` picks a backend per call from the inputs and what this install can run;
- :mod:`.extension` loads the compiled kernels (``srntt_core._C``: C++ on the CPU, CUDA);
- :mod:`.torch_backend` is the plain-torch backend, chunked, O(N) memory, runs everywhere;
- :mod:`.geometry` holds the patch-grid formula, the norm epsilon and every size bound, once.

The Triton kernels install as ``srntt_core._triton`` (their source is ``kernels/``).
"""
