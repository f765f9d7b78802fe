"""Autocast as SDPA has it, for the operator: in an autocast region of q's device type, q, k and v in fp32 / fp16 /
bf16 go to the region's dtype (SDPA is on autocast's list; lhcompile's ops are not), outside one they stay as they
are. ``autocast_like_sdpa`` for eager code; ``lhcompile::as_sdpa_inputs`` for the graphs the pass rewrites."""

from __future__ import annotations

import torch
from torch import Tensor


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 stays: autocast leaves it alone


def autocast_like_sdpa(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v as autocast hands them to SDPA: in an autocast region of q's device type, those in fp32/fp16/bf16
    go to the region's dtype; outside one, as they are."""
    device_type = q.device.type
    if not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.device.type == device_type and t.dtype in _AUTOCAST_DTYPES else t

    return cast(q), cast(k), cast(v)



_LIBRARY = torch.library.Library("lhcompile", "FRAGMENT")

# q, k and v as SDPA takes them in an autocast region, for the graphs the pass rewrites: nothing outside one (the
# inputs themselves, no copy), the region's dtype inside one. An op, so that the rule holds where the graph runs,
# whatever the region is at the time the pass traces it
_LIBRARY.define("as_sdpa_inputs(Tensor(a) q, Tensor(b) k, Tensor(c) v) -> (Tensor(a), Tensor(b), Tensor(c))")
_LIBRARY.impl("as_sdpa_inputs", lambda q, k, v: (q, k, v), "CompositeImplicitAutograd")


def _register_as_sdpa_inputs(device_type: str, dispatch_key: str) -> None:
    def kernel(q, k, v):
        q, k, v = autocast_like_sdpa(q, k, v)
        with torch.autocast(device_type, enabled=False):
            return torch.ops.lhcompile.as_sdpa_inputs(q, k, v)

    _LIBRARY.impl("as_sdpa_inputs", kernel, dispatch_key)


_register_as_sdpa_inputs("cpu", "AutocastCPU")
_register_as_sdpa_inputs("cuda", "AutocastCUDA")
