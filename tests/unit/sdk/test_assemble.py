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
