"""The Lighthouse operator and its kernels: the public op (``attention``), the operator on one sequence composed of
its stages (``lighthouse``), the stages as torch.library ops with their implementations per device (``stages``:
``reference``, the pure-PyTorch oracle that is also the CPU path, and ``kernels``, Triton on CUDA), the scorers that
rank entries (``scorers``), RoPE after selection (``rotary``), autocast as SDPA has it (``autocast``), packed
documents (``documents``) and context parallelism (``context_parallel``). The selection's geometry is
``lhcompile.geometry``, beside the configuration it derives from. It knows nothing of graphs or models."""
