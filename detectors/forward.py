"""The network's forward pass on a request, run once and shared by the answer and every stage.

The first caller (in the firewall: the probing stage, else the prediction step) runs the model on
``ctx.tensor``; later callers with the same model get the same ``Forward`` (logits and features)
from ``ctx.scratch``. A stage used on its own, with a context it built, simply runs the model.
"""

from __future__ import annotations

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
