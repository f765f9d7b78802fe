"""Rewriting captured graphs: the Lighthouse pass over one graph (``lighthouse_pass``), what the user asked for,
validated once (``options``), where the rewritten attention runs (``placements``), the texts of its reasons and
warnings (``diagnostics``), the graphs it builds for batches that need less (``batches``) and its debug dumps
(``debug``). It builds on ``lhcompile.passes`` (pure FX: finding, rewriting and restoring attention calls) and
calls the operator (``lhcompile.operator``) into the graphs it rewrites."""
