"""lhcompile in the Hugging Face Trainer: a callback that runs the two-stage recipe inside ``Trainer.train()``.

    trainer = Trainer(model, args, train_dataset=...,
                      callbacks=[LighthouseCallback(LighthouseConfig(topk=1536), recovery_start=0.7)])
    trainer.train()

At the start of training the callback applies the Lighthouse pass to the model; at ``recovery_start`` of the
run's steps it restores the dense model, which trains on with the same optimizer and scheduler state (the
Trainer keeps both; only the attention changes). Evaluation always runs dense (eval mode). Gradient
checkpointing (``gradient_checkpointing=True``) and ``torch_compile=True`` work: the pass rewrites
checkpointed layers, and the Trainer's compiled wrapper calls the model's own compiled call. At the end of
training the model is dense again, so what the Trainer saves is the untouched model.
"""

from __future__ import annotations

from typing import Callable

from transformers import TrainerCallback

import lhcompile

from ..config import LighthouseConfig
from ..report import Report


class LighthouseCallback(TrainerCallback):
    """Lighthouse attention for the first ``recovery_start`` of the training steps, dense after that.

    ``compiler`` defaults to the Trainer's ``torch_compile_backend`` when ``torch_compile`` is on, else "eager"
    (the rewritten graph runs op by op; pass "inductor" to compile it anyway).
    """

    def __init__(self, config: LighthouseConfig | None = None, *, recovery_start: float = 0.7,
                 filter_fn: Callable[[str], bool] | None = None, compiler: str | None = None) -> None:
        if not 0.0 <= recovery_start <= 1.0:
            raise ValueError(f"LighthouseCallback: recovery_start={recovery_start!r} must be a share of the steps, "
                             "between 0 and 1")
        self.config = config or LighthouseConfig()
        self.recovery_start = recovery_start
        self.filter_fn = filter_fn
        self.compiler = compiler
        self.switch_step: int | None = None
        """The global step at which the model goes dense (known once training starts)."""
        self.switched_at: int | None = None
        """The global step at which it did."""
        self.report: Report | None = None
        """What the pass found and did, as it stood at the switch."""
        self._model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.switch_step = round(self.recovery_start * state.max_steps)
        if state.global_step >= self.switch_step:  # resumed past the switch: the dense stage goes on
            return
        compiler = self.compiler or ((args.torch_compile_backend or "inductor") if args.torch_compile else "eager")
        lhcompile.apply(model, self.config, compiler=compiler, filter_fn=self.filter_fn)
        self._model = model

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._model is not None and state.global_step >= self.switch_step:
            self._restore()
            self.switched_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self._model is not None:
            self._restore()

    def _restore(self) -> None:
        self.report = lhcompile.inspect(self._model)
        lhcompile.restore(self._model)
        self._model = None
