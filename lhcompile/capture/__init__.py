"""Capturing a model: compiling it in place (``applied``), finding its layers and its attention sites from its own
forward (``plan``), saying where each call stands and which batch it serves (``calls``), the torch.compile backend
that runs the rewrite on each captured graph and chooses a graph per call (``backend``), what a batch needs, read
from a graph's inputs before it runs (``probe``), and the numbering of DDP's gradient buckets (``ddp_buckets``)."""
