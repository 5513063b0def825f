"""Layer 4: grouped GEMM, one module per concern (imports go down this list).

- :mod:`.config`: options (``Algorithm``, ``ComputePrecision``, ``GroupedGemmConfig``).
- :mod:`.plan`: shapes, the row-major to column-major mapping, row layouts
  (grouped-contiguous, chunk-aligned, padded capacity; ``layout_for`` is the rule),
  operand addresses, capacities.
- :mod:`.tables`: tuning tables, their files and the fallback chain.
- :mod:`.select`: rules and choices (``select_algorithm``, the layer's pair).
- :mod:`.pointers`: device pointer arrays for the batched and grouped calls.
- :mod:`.backends`: how each algorithm runs (``backends.cublas`` now).
- :mod:`.autotune`: AUTO's measuring on first sight.
- :mod:`.executor`: checks, choice, dispatch to a back end; :mod:`.gmm`: ``gmm()``;
  :mod:`.masked`: ``gmm_masked()`` on the masked fixed-capacity layout.
"""
