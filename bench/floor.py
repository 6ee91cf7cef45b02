"""The floor of `make bench`: a plain grpc.aio server of the same contract answering from memory.

No interceptors, no router, no upstream: Complete and StreamComplete answer with messages parsed once at start,
chosen by the request's last message. The answers are the gateway's own, recorded by the bench in the same run: a
unary answer the same message; a stream the same text as a message per upstream chunk (`a_message_per_chunk`), as a
relay that forwards each chunk on its own sends it, where the gateway joins the chunks that reach it together; or,
with --joined, the messages the gateway sent (as large in all, and, where the request's max_tokens says how many, a
stream of the plain gateway's had during the same turns, as many: `bench.__main__.grpc_calls`): what the gateway's
own work costs beside them, its joining of chunks not counted as its gain. It
runs on the event loop the gateway runs on (`--loop`), so that the loop is not counted as the gateway's gain, and
registers its service as the gateway does (a generic handler alone: `llmrelay_server.decoding.GenericOnly`), so that
the gateway's cheaper registration is not counted as its gain either.

Usage: python -m bench.floor --listen HOST:PORT --answers FILE [--loop asyncio|uvloop] [--joined]
(FILE: JSON {"complete": {prompt: base64 CompleteResponse}, "stream": {prompt: [base64 StreamCompleteResponse]},
"joined": {prompt: [base64 StreamCompleteResponse]}})
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
from llmrelay import v1 as pb
from llmrelay_server.decoding import GenericOnly


class FloorServicer(pb.LLMServiceServicer):
    def __init__(self, answers: dict[str, Any], *, joined: bool = False) -> None:
        self._complete = {
            prompt: pb.CompleteResponse.FromString(base64.b64decode(data))
            for prompt, data in answers["complete"].items()
        }
        self._stream = {
            prompt: [pb.StreamCompleteResponse.FromString(base64.b64decode(data)) for data in messages]
            for prompt, messages in answers["joined" if joined else "stream"].items()
        }
        self._split: dict[tuple[str, int], list[pb.StreamCompleteResponse]] = {}
        """A stream's messages by prompt and how many the request asked for (`split`), made at the first ask."""

    async def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        return self._complete[request.messages[-1].content]

    async def StreamComplete(self, request: pb.StreamCompleteRequest, context: Any) -> AsyncIterator[Any]:
        prompt = request.messages[-1].content
        wanted = request.options.max_tokens
        stream = self._stream[prompt] if not wanted else self._split.get((prompt, wanted))
        if stream is None:
            stream = self._split[prompt, wanted] = split(self._stream[prompt], wanted)
        for message in stream:
            yield message

    async def _unimplemented(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the floor answers Complete and StreamComplete only")

    CountTokens = Embed = GetUsage = Health = _unimplemented


def split(stream: list[pb.StreamCompleteResponse], messages: int) -> list[pb.StreamCompleteResponse]:
    """The stream as `messages` messages (two at least): its text in as many pieces as make one fewer, as near one
    size as may be, each in a message like its first, then its last message (the finish reason and usage)."""
    *texts, last = stream
    text = "".join(message.delta.content for message in texts)
    pieces = max(1, messages - 1)
    bounds = [len(text) * index // pieces for index in range(pieces + 1)]
    split_stream = []
    for start, end in itertools.pairwise(bounds):
        piece = pb.StreamCompleteResponse()
        piece.CopyFrom(texts[0])
        piece.delta.content = text[start:end]
        split_stream.append(piece)
    return [*split_stream, last]


async def serve(listen: str, answers: dict[str, Any], joined: bool) -> None:
    server = grpc.aio.server()
    # The generated function's stub asks for a server, though it calls only these two methods of it.
    servicer = FloorServicer(answers, joined=joined)
    pb.add_LLMServiceServicer_to_server(servicer, cast(grpc.aio.Server, GenericOnly(server)))
    server.add_insecure_port(listen)
    await server.start()
    print(f"floor listening on {listen}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--answers", type=Path, required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--joined", action="store_true", help="a stream as the messages the gateway sent")
    args = parser.parse_args()
    answers = json.loads(args.answers.read_text())
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.listen, answers, args.joined))
    else:
        asyncio.run(serve(args.listen, answers, args.joined))


if __name__ == "__main__":
    main()
