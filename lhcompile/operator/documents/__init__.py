"""Packed documents: where they begin, dense attention within each, and Lighthouse per document.

A packed batch (B, N) holds documents one after another; ``Documents`` says where each begins. Lighthouse per
document (``lighthouse_documents``) computes, for every document of at least ``config.min_lighthouse_len``
tokens, what ``lighthouse_attention`` computes on that document alone (its own pyramid, tiles and scatter), and
for every shorter one dense causal attention within it; nothing crosses a boundary. Document lengths are data,
not shapes: every tensor here has a size fixed by (B, N) and the configuration, so a compiled graph serves every
mix of documents. How:

- ``layout``: a few integer ops over the tokens, once per batch, relay the long documents into one stream, batch
  rows one after another: each starts on a coarsest-block boundary, is zero-padded to whole tiles as the
  single-sequence operator pads, and is followed by one empty coarsest block, so that no pooled entry spans two
  documents and the causal shift of a document's last entries lands in its own gap. The unchanged score, gather
  and scatter stages run on that stream; ``select_documents`` runs each document's tiles on their own.
- ``attention``: the gathered entries of all long documents and the tokens of all short ones go through
  ``document_attention`` (dense causal attention within each document), one call each: on a GPU as the
  ``planner`` splits them into kernel calls, elsewhere as the ``reference`` computes it, document by document.
- ``forms``: the ``Documents`` API and the forms in which a model's attention call holds its documents.
"""

from .attention import document_attention, runs_kernels
from .forms import Documents, document_lengths, longest_document, starts_of, starts_of_positions
from .lighthouse import dense_documents, lighthouse_documents
from .planner import PLANNER, DENSE_SHARE

__all__ = ["DENSE_SHARE", "Documents", "PLANNER", "dense_documents", "document_attention", "document_lengths",
           "lighthouse_documents", "longest_document", "runs_kernels", "starts_of", "starts_of_positions"]
