"""One training step: forward and backward over a batch, the team's reduction, clipping, and the
optimizer's update (skipped for a non-finite loss or gradient).

Not here: the loop around it (train.py), the maths (model.py, kernels/), the optimizers (optim.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from charrnn.model import Model
from charrnn.optim import Optimizer, clip_grad_norm, clip_grad_value, grad_norm
from charrnn.team import Solo


@dataclass
class StepResult:
    loss: float  # mean loss of the batch (over every worker's streams, with a reduction)
    norm: float  # the gradient's global norm before clipping
    finite: bool  # False: the step was not applied (non-finite loss or gradient)
    h: np.ndarray  # the state after the batch, to carry into the next one
    c: np.ndarray


def train_step(model: Model, opt: Optimizer, x, y, h, c, masks, lr: float, clip: float, clip_mode: str,
               reduce=Solo.reduce, weight_masks=None, avg=None, rate: float = 0.0) -> StepResult:
    """One update: forward and backward over the batch (with output dropout `masks` and weight
    drop `weight_masks`, either None), the gradient reduction (`reduce(grad, loss)` combines the
    gradient in place and returns the combined loss: data-parallel workers plug an all-reduce in
    here), clipping, and the optimizer step, which a non-finite loss or gradient skips (the
    caller decides what to do about it). The step moves the average of the weights `avg`, if
    given, `rate` of the way to the new weights, in the optimizer's own pass."""
    out = model.forward_backward(x, y, h, c, masks=masks, weight_masks=weight_masks, precision=model.precision)
    grad = out["grad"]
    loss = reduce(grad, out["loss"])
    if clip > 0 and clip_mode == "value":
        clip_grad_value(grad, clip)
        norm = grad_norm(grad)
    elif clip > 0:
        norm = clip_grad_norm(grad, clip)
    else:
        norm = grad_norm(grad)
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        opt.step(model.theta, grad, lr, avg=avg, rate=rate)
    return StepResult(loss, norm, finite, out["h"], out["c"])
