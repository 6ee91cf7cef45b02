"""What the call in progress has been billed: the router charges it where it bills the ledger, the limits settle
with it when the call ends.

A context variable, like a trace context: the layers that bill need not know who listens, and a call that nobody
meters (no limits configured) pays one lookup.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from llmrelay_server.domain import TokenUsage


@dataclass(slots=True)
class Meter:
    tokens: int = 0
    """Prompt plus completion tokens billed."""
    usd_micros: int = 0


current_meter: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("llmrelay_meter", default=None)


def charge(usage: TokenUsage) -> None:
    """Adds billed usage to the call's meter, if the call has one."""
    meter = current_meter.get()
    if meter is not None:
        meter.tokens += usage.total_tokens
        if usage.cost is not None:
            meter.usd_micros += usage.cost.usd_micros
