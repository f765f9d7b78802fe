"""The Lighthouse operator and its kernels: the public op (``attention``), the selection geometry (``geometry``),
the stages as torch.library ops with their implementations per device (``stages``: ``reference``, the pure-PyTorch
oracle that is also the CPU path, and ``kernels``, Triton on CUDA), the scorers that rank entries (``scorers``),
RoPE after selection (``rotary``), autocast as SDPA has it (``autocast``), packed documents (``documents``) and
context parallelism (``context_parallel``). It knows nothing of graphs or models."""
