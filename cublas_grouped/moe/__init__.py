"""MoE expert layers: argument checks, routing, the dispatch plan, the layer,
fixed-capacity decode and modules. Public names are re-exported by
``cublas_grouped``."""
