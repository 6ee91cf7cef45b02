"""Limits: requests and tokens per minute, streams at once and spend per day, per caller key and for the gateway.

A server interceptor admits each model call before any upstream is contacted: it reserves the call's share of every
limit that applies, at once or not at all (`Limiter.reserve`, the one atomic check-and-reserve step), and refuses
with RESOURCE_EXHAUSTED naming the limit (ErrorInfo, QuotaFailure, RetryInfo) when one would be passed; a call
that alone asks more than a limit allows gets no RetryInfo, as no wait would admit it, and is told what to change.
Tokens are reserved before they are spent: the prompt's offline count plus its max_tokens (or
`reserve_completion_tokens`), and the cost of that at the requested model's price. When the call ends, the
reservation is settled with what the call was billed (`metering`): an answer's real usage, a broken stream's part,
nothing for a call that failed.

The limiter's state sits behind `Limiter` (`interface`): `InProcessLimiter` (`in_process`) keeps it in this process;
`RedisLimiter` (`redis`, imported where Redis is configured) keeps it in Redis, where one script reserves all of a
call's subjects at once, so N gateways enforce one limit.
"""

from llmrelay_server.limits.in_process import InProcessLimiter
from llmrelay_server.limits.interceptor import LimitsInterceptor
from llmrelay_server.limits.interface import (
    GATEWAY,
    STREAM_RETRY_S,
    WINDOW_S,
    Ask,
    Limiter,
    Reservation,
    key_subject,
)

__all__ = [
    "GATEWAY",
    "STREAM_RETRY_S",
    "WINDOW_S",
    "Ask",
    "InProcessLimiter",
    "Limiter",
    "LimitsInterceptor",
    "Reservation",
    "key_subject",
]
