"""The graphs the pass builds for batches that need less than Lighthouse per document, by name.

A rewritten graph runs Lighthouse per document with stages sized for the most long documents a batch could hold,
since a graph cannot choose its work by data without ``torch.cond`` (whose backward recomputes the forward). Some
batches need less, and the backend keeps a graph for each kind (``lhcompile.capture.probe`` tells them apart):

- ``AS_CAPTURED``: every document is shorter than ``config.min_lighthouse_len``, so Lighthouse per document is dense
  attention within each document, which is exactly what the graph computed before the pass;
- ``ON_DOCUMENT_ATTENTION``: as ``AS_CAPTURED``, where lhcompile's ``document_attention`` is faster than the model's
  own kernel on the batch's documents, the graph rewritten for it (on a GPU, in half precision, on one device);
- ``ROWS``: every row is one document (of the graph's static length), so Lighthouse per document is plain Lighthouse
  on each row, the graph rewritten as for plain causal attention;
- ``DOCUMENTS``: any other batch, the rewritten graph.

The names are what ``Report.variant_calls`` counts.
"""

AS_CAPTURED, ON_DOCUMENT_ATTENTION, ROWS, DOCUMENTS = "as captured", "dense", "rows", "documents"
VARIANTS = {AS_CAPTURED: ("no document long enough for Lighthouse", "as captured (dense within documents)"),
            ON_DOCUMENT_ATTENTION: ("no document long enough for Lighthouse, and documents of few widths",
                                    "rewritten for dense attention within documents (lhcompile.document_attention)"),
            ROWS: ("one document per row", "rewritten for plain Lighthouse on each row")}
"""What a batch that runs each graph besides the rewritten one held, and what that graph is."""
DENSE_BATCHES = frozenset({AS_CAPTURED, ON_DOCUMENT_ATTENTION})
"""The graphs of batches without a long document: dense within documents (``Report.dense_batches``)."""
INSTEAD = {ON_DOCUMENT_ATTENTION: AS_CAPTURED}
"""The graph that serves a batch where its own did not compile (else the rewritten one does)."""
