"""The Python SDK's StreamAssembler on its own, without a server: tool calls put together from their fragments."""

from __future__ import annotations

from llmrelay import StreamAssembler
from llmrelay import v1 as pb


def fragment(index: int, **fields: str) -> pb.StreamCompleteResponse:
    return pb.StreamCompleteResponse(delta=pb.MessageDelta(tool_calls=[pb.ToolCallDelta(index=index, **fields)]))


def test_a_calls_id_name_and_signature_are_its_first_fragments_and_its_arguments_all_of_them() -> None:
    assembler = StreamAssembler()
    for chunk in (
        fragment(1, id="b", name="g", arguments='{"y"'),
        fragment(0, id="a", name="f", arguments="", signature="sig_a"),
        fragment(0, arguments='{"x": 1}', signature="another"),
        fragment(1, arguments=": 2}"),
    ):
        assembler.add(chunk)

    calls = assembler.result().message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("a", "f", '{"x": 1}'),
        ("b", "g", '{"y": 2}'),
    ]
    assert calls[0].signature == "sig_a" and not calls[1].HasField("signature")


def test_each_field_of_the_answer_is_the_latest_message_that_set_it() -> None:
    """The last message's alone, as the Go and TypeScript SDKs' assemblers keep them: a last message without the id
    (a stream a proxy wrote) lost it, and usage before the finish reason's message was dropped."""
    assembler = StreamAssembler()
    usage = pb.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    attempt = pb.Attempt(backend="b1", outcome=pb.ATTEMPT_OUTCOME_SUCCEEDED)
    for chunk in (
        pb.StreamCompleteResponse(id="c1", backend="b1", model="m1", delta=pb.MessageDelta(content="hi")),
        pb.StreamCompleteResponse(usage=usage, attempts=[attempt]),
        pb.StreamCompleteResponse(finish_reason=pb.FINISH_REASON_STOP),
    ):
        assembler.add(chunk)

    answer = assembler.result()
    assert (answer.id, answer.backend, answer.model, answer.finish_reason) == ("c1", "b1", "m1", pb.FINISH_REASON_STOP)
    assert answer.usage == usage and list(answer.attempts) == [attempt]
