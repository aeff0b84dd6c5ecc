"""Work once per request: the network's forward pass, and only new content scored.

``shared_forward``: the first caller (in the firewall: the probing stage, else the prediction step)
runs the model on ``ctx.tensor``; later callers with the same model get the same ``Forward``
(logits and features) from ``ctx.scratch``. A stage used on its own, with a context it built,
simply runs the model.

``novel_items``: the images that are new content (``ctx.scratch["novel"]``, set by the probing
stage; all of them without it). The per-image detectors' client tests observe only those
(``detectors.evidence.client_rate_findings``), so re-sent content need not be scored at all:
``novel_scores`` scores only those, from the shared pass's logits.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from firewall.stage import RequestContext
from models.runtime import Forward, OnnxClassifier


def shared_forward(ctx: RequestContext, model: OnnxClassifier) -> Forward:
    cached = ctx.scratch.get("forward")
    if cached is not None and cached[0] is model:
        return cached[1]
    assert ctx.tensor is not None
    result = model.forward(ctx.tensor)
    ctx.scratch["forward"] = (model, result)
    return result


def novel_items(ctx: RequestContext) -> np.ndarray:
    """Indices of the images that are new content."""
    count = 0 if ctx.tensor is None else len(ctx.tensor)
    return np.flatnonzero(ctx.scratch.get("novel", [True] * count))


def novel_scores(
    ctx: RequestContext, model: OnnxClassifier, score: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray:
    """``score(images, logits)`` of the new images, 0 for re-sent content (no new observation)."""
    assert ctx.tensor is not None
    scores = np.zeros(len(ctx.tensor))
    novel = novel_items(ctx)
    if len(novel):
        scores[novel] = score(ctx.tensor[novel], shared_forward(ctx, model).logits[novel])
    return scores
