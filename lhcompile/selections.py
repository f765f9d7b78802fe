"""What Lighthouse selection keeps: for one forward of a model in its Lighthouse stage, which base positions the
entries gathered at each Lighthouse site cover, per head and level (``selections``), whether a position of interest
(a passkey's needle) is among them, and a picture of it (``Selections.plot``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .config import LighthouseConfig
from .geometry import level_offsets
from .operator.attention import lighthouse_attention
from .operator.scorers import SCORERS
from .operator.stages import select
from .passes import SDPA_PARAMS, bind_arguments
from .report import LighthouseWarning


@dataclass(frozen=True)
class SiteSelection:
    """The selection of one Lighthouse site (an SDPA call, counted in execution order as ``dense_layers`` counts)."""

    site: int
    covered: Tensor
    """(L, B, H, N) bool: at level l, the base positions that an entry of level l gathered for the dense attention
    covers (every coarsest entry is gathered, so level L-1 covers everything)."""

    def covers(self, position: int, level: int = 0, row: int = 0) -> Tensor:
        """(H,) bool: whether each head's entries of ``level`` cover ``position`` of batch row ``row``."""
        return self.covered[level, row, :, position]


@dataclass(frozen=True)
class Selections:
    """The selections of every Lighthouse site of one forward (``selections``)."""

    config: LighthouseConfig
    sites: list[SiteSelection]
    calls: int
    """SDPA calls the forward made, Lighthouse sites and dense ones."""
    output: Any
    """What the forward returned (with Lighthouse at its Lighthouse sites)."""
    dense: dict[int, str]
    """The sites that ran SDPA, each with why (a dense layer, not plainly causal, too short)."""

    def fraction_covering(self, position: int, level: int = 0, row: int = 0) -> float:
        """The fraction of (site, head) pairs whose entries of ``level`` cover ``position`` (level 0: the token
        itself is attended at full resolution)."""
        hits = [s.covers(position, level, row) for s in self.sites]
        return float(torch.cat(hits).float().mean()) if hits else float("nan")

    def plot(self, path: str, site: int, *, mark: int | None = None, row: int = 0, width: int = 1024) -> None:
        """A PNG of one site: per level below the coarsest (one panel each), heads as rows and positions as columns
        (binned to ``width`` columns: a bin is the share of its positions covered), ``mark`` a dashed line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        chosen = next((s for s in self.sites if s.site == site), None)
        if chosen is None:
            why = f" ({self.dense[site]})" if site in self.dense else " (not recorded)" if site < self.calls else ""
            raise ValueError(f"Selections.plot: site {site} ran no Lighthouse{why}; its Lighthouse sites are "
                             f"{[s.site for s in self.sites]}")
        levels = chosen.covered.shape[0] - 1
        n = chosen.covered.shape[-1]
        bins = min(width, n)
        fig, axes = plt.subplots(levels, 1, figsize=(9, 1.2 + 0.25 * chosen.covered.shape[2] * levels), squeeze=False)
        for lvl, ax in enumerate(axes[:, 0]):
            cover = chosen.covered[lvl, row].float()
            shares = F.adaptive_avg_pool1d(cover.unsqueeze(0), bins)[0]
            ax.imshow(shares.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest",
                      extent=(0, n, shares.shape[0] - 0.5, -0.5))
            ax.set_ylabel(f"level {lvl}\nhead")
            if mark is not None:
                hit = int(chosen.covers(mark, lvl, row).sum())
                ax.axvline(mark, color="red", ls="--", lw=1)
                ax.set_title(f"level {lvl} (span {self.config.pooling_factor ** lvl}): {hit} of "
                             f"{shares.shape[0]} heads cover position {mark}", fontsize=8)
        axes[-1, 0].set_xlabel("base position")
        fig.suptitle(f"site {site}: base positions the gathered entries cover (the coarsest level covers all)",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _coverage(index: Tensor, n: int, levels: int, p: int) -> Tensor:
    """(L, B, H, n) bool from a selection's flat pyramid indices (B, H, S) over n base positions."""
    offsets = level_offsets(n, levels, p)
    covered = []
    for lvl in range(levels):
        size = n // p**lvl
        local = torch.where((index >= offsets[lvl]) & (index < offsets[lvl + 1]), index - offsets[lvl], size)
        hit = torch.zeros(*index.shape[:2], size + 1, dtype=torch.bool, device=index.device).scatter(2, local, True)
        covered.append(hit[..., :size].repeat_interleave(p**lvl, dim=2))
    return torch.stack(covered)


class _Sites(TorchFunctionMode):
    """SDPA calls in execution order: counted; with ``lighthouse`` (site positions), those answered by Lighthouse,
    the selection of those in ``record`` recorded, and why each other one ran SDPA."""

    def __init__(self, config: LighthouseConfig, lighthouse: set[int] | None = None,
                 record: set[int] | None = None, total: int = 0) -> None:
        super().__init__()
        self.config, self.lighthouse, self.record = config, lighthouse, record or set()
        self.total = total
        """The forward's SDPA calls, counted before (for the reasons)."""
        self.calls = 0
        self.found: list[SiteSelection] = []
        self.dense: dict[int, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        site, self.calls = self.calls, self.calls + 1
        bound = bind_arguments(func, args, kwargs, SDPA_PARAMS)
        q, k, v = bound["query"], bound["key"], bound["value"]
        if self.lighthouse is None:
            return func(*args, **kwargs)
        why = self._dense_because(site, bound)
        if why:
            self.dense[site] = why
            return func(*args, **kwargs)
        if site in self.record:
            self.found.append(SiteSelection(site, self._covered(q, k, v)))
        return lighthouse_attention(q, k, v, self.config, scale=bound["scale"])

    def _dense_because(self, site: int, bound: dict[str, Any]) -> str | None:
        n, c = bound["query"].shape[2], self.config
        if site not in self.lighthouse:
            return f"dense layer (site {site} of {self.total} is in dense_layers={c.dense_layers})"
        if bound["attn_mask"] is not None or not bound["is_causal"] or bound["dropout_p"]:
            return "not plainly causal: an attn_mask, is_causal=False or dropout_p > 0"
        if n < c.min_lighthouse_len:
            return f"sequence too short: N={n} < min_lighthouse_len={c.min_lighthouse_len}"
        return None

    def _covered(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c, n = self.config, q.shape[2]
        padded = c.padded_len(n)
        with torch.no_grad():
            q, k, v = (F.pad(t.detach(), (0, 0, 0, padded - n)) for t in (q, k, v))
            s_qk, s_kq = SCORERS[c.scorer].pyramids(q, k, v, c, None, None)
            index, _ = select(s_qk, s_kq, padded, c.levels, c.pooling_factor, c.topk, c.tile_budget)
        return _coverage(index, padded, c.levels, c.pooling_factor)[..., :n].cpu()


def selections(model: torch.nn.Module, *args: Any, config: LighthouseConfig | None = None,
               sites: Sequence[int] | None = None, **kwargs: Any) -> Selections:
    """Run ``model(*args, **kwargs)`` once as its Lighthouse stage runs it, recording what each Lighthouse site
    selects.

    Every SDPA call is a site, counted in execution order; the sites ``config.dense_layers`` keeps dense, those not
    plainly causal and those shorter than ``config.min_lighthouse_len`` run SDPA, every other one Lighthouse (so a
    later site sees what it sees in training). The model runs its own code eagerly (an applied model's compiled
    layers included), without gradients.

    Args:
        model: the model, applied or not.
        *args, **kwargs: one forward's inputs.
        config: the Lighthouse configuration of its Lighthouse stage (default ``LighthouseConfig()``).
        sites: record only these sites (default: every Lighthouse site); the others run as in training all the same.

    Returns:
        ``Selections``: per Lighthouse site, the positions its gathered entries cover per level and head.

    Example::

        found = lhcompile.selections(model, input_ids=prompt, config=config)
        found.fraction_covering(needle)                       # (site, head) pairs attending the needle itself
        found.plot("site3.png", site=3, mark=needle)
    """
    config = config or LighthouseConfig()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        counting = _Sites(config)
        with counting:
            model(*args, **kwargs)
        if counting.calls == 0:
            warnings.warn("lhcompile.selections: the forward made no F.scaled_dot_product_attention call, so there is "
                          "no selection to show (varlen and FlexAttention calls are not pictured)", LighthouseWarning,
                          stacklevel=2)
        lighthouse = set(range(counting.calls)) - config.dense_indices(counting.calls)
        record = lighthouse if sites is None else lighthouse & set(sites)
        recording = _Sites(config, lighthouse, record, counting.calls)
        with recording:
            output = model(*args, **kwargs)
    return Selections(config, recording.found, counting.calls, output, recording.dense)
