"""TAID's adaptive interpolation schedule (Shing et al. 2025, "TAID: Temporally Adaptive Interpolated Distillation").

The loss itself (``kdstore.losses.taid_kl``) distils toward p_t = softmax((1 - t) stopgrad(log q) + t log p);
this module holds t and moves it from ``taid_start`` toward ``taid_end`` as training goes, faster while the loss
keeps falling. A trainer calls ``state.update(metrics["kd"])`` once per optimizer step and saves
``state.state_dict()`` with its checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # losses imports this module; the config is only read here
    from kdstore.losses import LossConfig


@dataclass
class TaidState:
    """TAID's interpolation weight t and its adaptive schedule (Shing et al. 2025, Algorithm 1).

    After each optimizer step call ``update(kd)`` with that step's KD loss (``metrics["kd"]``, once per
    step, not per micro-batch). The relative loss change drives a momentum m; t then grows by
    ``taid_step_size * sigmoid(m) * (1 - t)``, capped at ``taid_end`` and, with ``taid_total_steps``,
    never below the linear ramp. Save ``state_dict()`` with the checkpoint to resume exactly.
    """

    config: LossConfig
    t: float = field(init=False)
    momentum: float = 0.0
    previous_loss: float | None = None
    num_updates: int = 0

    def __post_init__(self) -> None:
        self.t = self.config.taid_start

    def update(self, loss: float) -> float:
        """Advance the schedule with one step's KD loss; returns the new t."""
        config, loss = self.config, float(loss)
        self.num_updates += 1
        if self.previous_loss is None:  # Algorithm 1: the first step only records the loss
            self.previous_loss = loss
            return self.t
        change = (self.previous_loss - loss) / (self.previous_loss + 1e-15)
        self.momentum = config.taid_momentum * self.momentum + (1 - config.taid_momentum) * change
        step = config.taid_step_size / (1 + math.exp(-self.momentum)) * (1 - self.t)
        ramp = config.taid_start
        if config.taid_total_steps:
            ramp += (config.taid_end - config.taid_start) * min(1.0, self.num_updates / config.taid_total_steps)
        self.t = min(config.taid_end, max(ramp, self.t + step))
        self.previous_loss = loss
        return self.t

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "momentum": self.momentum, "previous_loss": self.previous_loss, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.momentum = float(state["t"]), float(state["momentum"])
        self.previous_loss = None if state["previous_loss"] is None else float(state["previous_loss"])
        self.num_updates = int(state["num_updates"])
