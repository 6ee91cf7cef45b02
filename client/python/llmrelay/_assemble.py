"""A stream's messages folded into the answer Complete would return, restart markers applied."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmrelay import v1 as pb


@dataclass
class _ToolCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    signature: str | None = None


class StreamAssembler:
    """Feed it every message of a StreamComplete, in order; `result()` is the whole answer.

    A message with `restart` set starts the answer over (the gateway restarts a broken stream on another backend
    when the request asked for INTERRUPT_POLICY_RESTART): everything before it is dropped. Tool calls are put
    together from their fragments by index, each with its signature where the upstream signed it.

    >>> assembler = StreamAssembler()
    >>> for chunk in client.stream(...):
    ...     assembler.add(chunk)
    >>> answer = assembler.result()
    """

    def __init__(self) -> None:
        self.restarts: list[pb.StreamRestart] = []
        """The restart markers seen, in order (each says why an attempt broke)."""
        self._reset()

    def _reset(self) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._signature: str | None = None
        self._tool_calls: dict[int, _ToolCall] = {}
        # The answer's fields, each as the latest message that set it had it (as the Go and TypeScript SDKs keep them):
        # the gateway sends id, backend and model in every message, the rest in the last.
        self._id = self._backend = self._model = ""
        self._finish_reason: pb.FinishReason.ValueType = pb.FINISH_REASON_UNSPECIFIED
        self._usage: pb.Usage | None = None
        self._attempts: list[pb.Attempt] = []

    def add(self, chunk: pb.StreamCompleteResponse) -> None:
        if chunk.HasField("restart"):
            self.restarts.append(chunk.restart)
            self._reset()
            return
        delta = chunk.delta
        if delta.HasField("content"):
            self._content.append(delta.content)
        if delta.HasField("reasoning"):
            self._reasoning.append(delta.reasoning)
        if delta.HasField("reasoning_signature"):
            self._signature = delta.reasoning_signature
        for fragment in delta.tool_calls:
            call = self._tool_calls.setdefault(fragment.index, _ToolCall())
            call.id = call.id or fragment.id
            call.name = call.name or fragment.name
            call.arguments.append(fragment.arguments)
            if call.signature is None and fragment.HasField("signature"):
                call.signature = fragment.signature
        self._id = chunk.id or self._id
        self._backend = chunk.backend or self._backend
        self._model = chunk.model or self._model
        self._finish_reason = chunk.finish_reason or self._finish_reason
        if chunk.HasField("usage"):
            self._usage = chunk.usage
        if chunk.attempts:
            self._attempts = list(chunk.attempts)

    def result(self) -> pb.CompleteResponse:
        """The answer so far; complete once the stream has ended without an error."""
        message = pb.Message(
            role=pb.ROLE_ASSISTANT,
            content="".join(self._content),
            tool_calls=[
                pb.ToolCall(
                    id=call.id,
                    function=pb.FunctionCall(name=call.name, arguments="".join(call.arguments)),
                    signature=call.signature,
                )
                for _, call in sorted(self._tool_calls.items())
            ],
        )
        if self._reasoning:
            message.reasoning = "".join(self._reasoning)
        if self._signature is not None:
            message.reasoning_signature = self._signature
        return pb.CompleteResponse(
            id=self._id,
            backend=self._backend,
            model=self._model,
            message=message,
            finish_reason=self._finish_reason,
            usage=self._usage,
            attempts=self._attempts,
        )
