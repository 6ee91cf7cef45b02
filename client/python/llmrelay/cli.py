"""`llmrelay`: the gateway from a terminal (complete, stream, tokens, health, usage)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from llmrelay import v1 as pb
from llmrelay._client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, Client, message
from llmrelay._errors import LLMRelayError

_FINISH = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        with Client(args.target, timeout=args.timeout) as client:
            args.run(client, args)
    except LLMRelayError as exc:
        details = f" (reason {exc.reason})" if exc.reason else ""
        for violation in exc.field_violations:
            details += f"\n  {violation.field}: {violation.description}"
        if exc.retry_delay_s is not None:
            details += f"\n  retry after {exc.retry_delay_s:g} s"
        sys.exit(f"llmrelay: {exc}{details}")
    except KeyboardInterrupt:
        sys.exit(130)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrelay", description="Talk to an llmrelay gateway.")
    parser.add_argument("--target", default=os.environ.get("LLMRELAY_TARGET", DEFAULT_TARGET), help="HOST:PORT")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline of the call in seconds")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    for name, run, text in (("complete", _complete, "one answer"), ("stream", _stream, "stream tokens as they come")):
        command = commands.add_parser(name, help=text)
        command.add_argument("prompt", help="the user message")
        command.add_argument("--model", help="a model, backend/model or alias (default: the default chain)")
        command.add_argument("--system", help="a system message to put first")
        command.add_argument("--max-tokens", type=int)
        command.add_argument("--temperature", type=float)
        command.add_argument("--exact-model", action="store_true", help="no fallback to another model")
        command.set_defaults(run=run)

    tokens = commands.add_parser("tokens", help="count the tokens of a text or a one-message chat")
    tokens.add_argument("text")
    tokens.add_argument("--model")
    tokens.add_argument("--chat", action="store_true", help="count as a user message, with chat overhead")
    tokens.set_defaults(run=_tokens)

    health = commands.add_parser("health", help="the backends' state")
    health.add_argument("--probe", action="store_true", help="probe the backends now")
    health.set_defaults(run=_health)

    usage = commands.add_parser("usage", help="token usage per backend, model and caller")
    usage.add_argument("--backend")
    usage.add_argument("--model")
    usage.add_argument("--caller")
    usage.set_defaults(run=_usage)
    return parser


def _chat(args: argparse.Namespace) -> list[pb.Message]:
    system = [message("system", args.system)] if args.system else []
    return [*system, message("user", args.prompt)]


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    return {k: v for k, v in options.items() if v is not None}


def _complete(client: Client, args: argparse.Namespace) -> None:
    answer = client.complete(_chat(args), model=args.model, exact_model=args.exact_model, **_options(args))
    print(answer.message.content)
    print(_summary(answer.backend, answer.model, answer.finish_reason, answer.usage), file=sys.stderr)


def _stream(client: Client, args: argparse.Namespace) -> None:
    for chunk in client.stream(_chat(args), model=args.model, exact_model=args.exact_model, **_options(args)):
        if chunk.delta.content:
            print(chunk.delta.content, end="", flush=True)
        if chunk.HasField("usage"):
            print()  # end the answer's line on stdout, so the summary on stderr stands apart
            print(_summary(chunk.backend, chunk.model, chunk.finish_reason, chunk.usage), file=sys.stderr)


def _summary(backend: str, model: str, finish_reason: pb.FinishReason.ValueType, usage: pb.Usage) -> str:
    estimated = " (estimated)" if usage.estimated else ""
    tokens = f"{usage.prompt_tokens}+{usage.completion_tokens} tokens{estimated}"
    return f"[{backend}/{model}, {_FINISH[finish_reason]}, {tokens}]"


def _tokens(client: Client, args: argparse.Namespace) -> None:
    if args.chat:
        count = client.count_tokens([message("user", args.text)], model=args.model)
    else:
        count = client.count_tokens(text=args.text, model=args.model)
    how = "estimated" if count.estimated else "exact"
    print(f"{count.token_count} tokens ({count.model}, {count.encoding}, {how})")


def _health(client: Client, args: argparse.Namespace) -> None:
    report = client.health(probe=args.probe)
    print(f"serving: {'yes' if report.serving else 'no'}")
    for backend in report.backends:
        state = "reachable" if backend.reachable else "unreachable"
        circuit = pb.CircuitState.Name(backend.circuit_state).removeprefix("CIRCUIT_STATE_").lower()
        latency = f"{backend.latency.ToNanoseconds() / 1e6:.1f} ms" if backend.HasField("latency") else "-"
        print(f"{backend.name:<12} {state:<12} circuit {circuit:<9} {latency:>9}  {backend.base_url}")
        if backend.models:
            print(f"{'':<12} models: {', '.join(backend.models[:10])}")
        if backend.HasField("last_error"):
            print(f"{'':<12} last error: {backend.last_error}")


def _usage(client: Client, args: argparse.Namespace) -> None:
    request = pb.GetUsageRequest(backend=args.backend, model=args.model, caller=args.caller)
    records = client.get_usage(request).records
    header = ("backend", "model", "caller", "requests", "prompt", "completion", "total", "cost (USD)")
    rows = [
        (r.backend, r.model, r.caller, r.requests, r.prompt_tokens, r.completion_tokens, r.total_tokens, _usd(r.cost))
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if any(r.cost.estimated for r in records):
        print("~ estimated: the gateway counted tokens, or the model has no known price")
    if any(r.cost.price_unknown for r in records):
        print("(no price): counted at the gateway's unknown_price rate; the upstream's bill may differ")


def _usd(cost: pb.Cost) -> str:
    """Micro-dollars as dollars to the last digit, from the integer (a float would round large totals)."""
    dollars, micros = divmod(cost.usd_micros, 1_000_000)
    mark = "~" if cost.estimated else ""
    unknown = " (no price)" if cost.price_unknown else ""
    return f"{mark}{dollars}.{micros:06d}{unknown}"


if __name__ == "__main__":
    main()
