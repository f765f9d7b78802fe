"""torchtitan's own ``torchtitan.train`` entry point on a CPU-only torch, for tests: the same trainer, config
manager, dataloader, parallelization and metrics, with the accelerator it hard-codes replaced by the CPU.

    python tests/torchtitan_trainer_on_cpu.py --module lighthouse_llama3 --config NAME [torchtitan flags]

torchtitan 0.3.0 picks "cuda" as its device when it sees no accelerator, asks that device for its name and
memory, and sets process-group timeouts with a device-id barrier; those four places are pointed at the CPU (the
memory monitor reads 0 GiB). Nothing of the training step itself is touched.
"""

from __future__ import annotations

import os
import types

import torch


class _CpuMemory:
    device_name, device_capacity_gib = "cpu", 0.0

    def get_peak_stats(self):
        return types.SimpleNamespace(max_active_gib=0.0, max_active_pct=0.0, max_reserved_gib=0.0,
                                     max_reserved_pct=0.0, num_alloc_retries=0, num_ooms=0)

    def reset_peak_stats(self) -> None:
        pass


def main() -> None:
    # set before any other torchtitan module imports these names
    import torchtitan.tools.utils as utils

    utils.device_type, utils.device_module = "cpu", torch.cpu
    utils.get_local_device = lambda: torch.device("cpu")
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.distributed.utils as dist_utils

    parallel_dims.device_type = "cpu"
    metrics.build_device_memory_monitor = _CpuMemory
    dist_utils.set_pg_timeouts = lambda *args, **kwargs: None
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29571")):
        os.environ.setdefault(name, value)
    from torchtitan.train import main as train

    train()


if __name__ == "__main__":
    main()
