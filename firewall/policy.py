"""What the firewall does with a request once the stages have inspected it.

A request without findings is predicted and answered. A request with findings is refused with
one generic message, and every finding is logged for the operator.
"""

from __future__ import annotations

import structlog

from firewall.errors import Refused
from firewall.pipeline import ModelPipeline
from firewall.stage import RequestContext

log = structlog.get_logger("firewall.alerts")


class ResponsePolicy:
    def decide(self, ctx: RequestContext, pipeline: ModelPipeline) -> None:
        """Set ``ctx.labels`` to the answer, or raise the rejection the client gets."""
        if not ctx.findings:
            pipeline.predict(ctx)
            return
        for finding in ctx.findings:
            log.warning(
                "alert",
                rule=finding.rule,
                score=finding.score,
                threshold=finding.threshold,
                item=finding.item,
                client_id=ctx.client_id,
                peer=ctx.peer,
                model=ctx.model,
                request_id=ctx.request_id,
            )
        raise Refused(f"{len(ctx.findings)} finding(s)")
