"""What answers cost, through a real gRPC channel: to the micro-dollar on every answer, summed in the ledger, the broken
attempt of a restarted stream included, local backends free, unknown prices flagged, and `llmrelay usage` shows it."""

from __future__ import annotations

import asyncio
import math
from fractions import Fraction

import grpc
import pytest
from harness import BIN
from llmrelay import v1 as pb
from llmrelay_server.app import Gateway
from support import FAST_ROUTER, OPENAI_TEST_KEY, GatewayFactory, StubFactory, chat, stream_chat, two_backends
from upstream import FakeUpstream

# USD per million tokens, i.e. micro-USD per token.
PROMPT_PRICE, COMPLETION_PRICE = Fraction("2.5"), Fraction("10.0")
MINI_PROMPT_PRICE, MINI_COMPLETION_PRICE = Fraction("0.4"), Fraction("1.6")
PRICING = """
pricing:
  "gpt-test": {prompt: 2.5, completion: 10.0}
"""
PROMPT = "what does this cost in the end"


def expected_micros(usage: pb.Usage, prompt_price: Fraction, completion_price: Fraction) -> int:
    """The cost of the usage the upstream reported (or the gateway counted), rounded once, up."""
    return math.ceil(usage.prompt_tokens * prompt_price + usage.completion_tokens * completion_price)


async def priced(stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream) -> pb.LLMServiceAsyncStub:
    return await stub_for(two_backends(primary, local, FAST_ROUTER + PRICING))


async def ledger(stub: pb.LLMServiceAsyncStub) -> dict[str, pb.UsageRecord]:
    return {r.backend: r for r in (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records}


async def test_a_unary_answer_costs_its_tokens_at_the_configured_price(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await priced(stub_for, primary, local)
    answer = await stub.Complete(chat(PROMPT), timeout=5)
    assert (answer.backend, answer.model, answer.usage.estimated) == ("openai", "gpt-test", False)
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    expected = expected_micros(answer.usage, PROMPT_PRICE, COMPLETION_PRICE)
    assert answer.usage.cost == pb.Cost(usd_micros=expected, estimated=False, price_unknown=False)
    assert expected > 0


async def test_a_streamed_answer_costs_the_same_and_the_ledger_sums_exactly(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await priced(stub_for, primary, local)
    unary = await asyncio.gather(*(stub.Complete(chat(f"{PROMPT} {'x ' * i}"), timeout=5) for i in range(7)))
    streamed = [c async for c in stub.StreamComplete(stream_chat(PROMPT), timeout=5)]
    final = streamed[-1].usage
    assert final.cost == pb.Cost(usd_micros=expected_micros(final, PROMPT_PRICE, COMPLETION_PRICE))
    assert all(not c.HasField("usage") for c in streamed[:-1])
    for answer in unary:
        assert answer.usage.cost.usd_micros == expected_micros(answer.usage, PROMPT_PRICE, COMPLETION_PRICE)

    record = (await ledger(stub))["openai"]
    assert record.requests == 8
    assert record.cost == pb.Cost(usd_micros=sum(a.usage.cost.usd_micros for a in unary) + final.cost.usd_micros)


async def test_thoughts_an_upstream_reports_beside_the_completion_are_billed_everywhere(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """Gemini's OpenAI endpoint reports a thinking model's thoughts in total_tokens alone (xAI in reasoning_tokens
    beside completion_tokens): they were never billed, in the answer, the ledger or the key's limits, though they are
    most of the output and priced as it."""
    stub = await priced(stub_for, primary, local)
    gemini = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 1105}
    primary.inject({"usage": gemini}, {"usage": gemini})
    answer = await stub.Complete(chat(PROMPT), timeout=5)
    streamed = [c async for c in stub.StreamComplete(stream_chat(PROMPT), timeout=5)]
    for usage in (answer.usage, streamed[-1].usage):
        assert (usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens) == (9, 1096, 1093)
        assert usage.cost.usd_micros == math.ceil(9 * PROMPT_PRICE + 1096 * COMPLETION_PRICE)
    record = (await ledger(stub))["openai"]
    assert (record.completion_tokens, record.cost.usd_micros) == (2 * 1096, 2 * answer.usage.cost.usd_micros)


async def test_a_restarted_stream_bills_the_broken_attempt_and_its_final_usage_includes_it(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    # The route after the broken one is paid too (the same upstream, another model), so both parts cost something.
    spare = f"""
  backends:
    - {{name: spare, kind: openai_compatible, base_url: "{primary.base_url}", model: gpt-test-mini,
       api_key: "{OPENAI_TEST_KEY}"}}
  order: [openai, spare, ollama]
"""
    mini = '  "gpt-test-mini": {prompt: 0.4, completion: 1.6}\n'
    stub = await stub_for(two_backends(primary, local, spare + FAST_ROUTER + PRICING + mini))
    primary.inject({"stream_cut_after": 3})
    request = stream_chat(PROMPT, on_interrupt=pb.INTERRUPT_POLICY_RESTART)
    chunks = [c async for c in stub.StreamComplete(request, timeout=10)]
    (marker,) = [c.restart for c in chunks if c.HasField("restart")]
    final = chunks[-1]
    assert (marker.backend, final.backend) == ("openai", "spare")

    broken = marker.usage
    partial = expected_micros(broken, PROMPT_PRICE, COMPLETION_PRICE)
    assert broken.completion_tokens > 0 and partial > 0
    # Counted by the gateway, so estimated.
    assert broken.cost == pb.Cost(usd_micros=partial, estimated=True)

    records = await ledger(stub)
    answered = records["spare"]
    whole = expected_micros(
        pb.Usage(prompt_tokens=answered.prompt_tokens, completion_tokens=answered.completion_tokens),
        MINI_PROMPT_PRICE,
        MINI_COMPLETION_PRICE,
    )
    assert answered.cost == pb.Cost(usd_micros=whole)
    assert records["openai"].cost == pb.Cost(usd_micros=partial, estimated=True)
    assert records["openai"].interrupted_requests == 1
    assert final.usage.cost == pb.Cost(usd_micros=partial + whole, estimated=True)


@pytest.mark.parametrize("served", ["gpt-test-2024-08-06", "gpt-test-latest"], ids=["dated-snapshot", "no-price"])
async def test_an_answer_naming_another_model_costs_the_configured_price_of_the_model_asked(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream, served: str
) -> None:
    """As OpenAI's answers do: "gpt-test" asked, "gpt-test-2024-08-06" answered; priced as "gpt-test", not as unknown.
    And a name with no price of its own ("gpt-test-latest") is priced as the model asked: it cost the unknown price,
    three times what the request reserved, and a key's budget was spent 2.7 times over by such calls."""
    stub = await priced(stub_for, primary, local)
    primary.inject({"served_model": served})
    answer = await stub.Complete(chat(PROMPT), timeout=5)
    assert answer.model == served
    expected = expected_micros(answer.usage, PROMPT_PRICE, COMPLETION_PRICE)
    assert answer.usage.cost == pb.Cost(usd_micros=expected, estimated=False, price_unknown=False)
    assert (await ledger(stub))["openai"].cost == pb.Cost(usd_micros=expected)


async def test_a_stream_cut_short_is_billed_for_the_model_that_answered(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    """As a whole stream is: its record under the answer's model (a whole one's and a cut one's under one name), at
    that model's price (it was billed as the model asked for, at half the snapshot's price here)."""
    snapshot = '  "gpt-test-2024-05-13": {prompt: 5.0, completion: 15.0}\n'
    stub = await stub_for(two_backends(primary, local, FAST_ROUTER + PRICING + snapshot))
    primary.inject({"served_model": "gpt-test-2024-05-13", "stream_cut_after": 3})
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        async for chunk in stub.StreamComplete(stream_chat(PROMPT, model="gpt-test", exact_model=True), timeout=5):
            assert chunk.model == "gpt-test-2024-05-13"
    assert broken.value.code() == grpc.StatusCode.ABORTED
    (record,) = (await stub.GetUsage(pb.GetUsageRequest(), timeout=5)).records
    assert (record.model, record.interrupted_requests) == ("gpt-test-2024-05-13", 1)
    usage = pb.Usage(prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens)
    assert record.cost == pb.Cost(usd_micros=expected_micros(usage, Fraction(5), Fraction(15)), estimated=True)


async def test_a_local_backend_costs_nothing(stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream) -> None:
    stub = await priced(stub_for, primary, local)
    answer = await stub.Complete(chat(PROMPT, model="ollama/tiny"), timeout=5)
    assert answer.backend == "ollama" and answer.usage.total_tokens > 0
    assert answer.usage.HasField("cost")
    assert answer.usage.cost == pb.Cost(usd_micros=0, estimated=False, price_unknown=False)
    assert (await ledger(stub))["ollama"].cost == pb.Cost(usd_micros=0)


async def test_an_unknown_model_on_a_paid_backend_is_flagged_and_counted_at_the_default_rate(
    stub_for: StubFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    stub = await stub_for(
        two_backends(primary, local, FAST_ROUTER + PRICING + "unknown_price: {prompt: 1, completion: 3}")
    )
    answer = await stub.Complete(chat(PROMPT, model="openai/gpt-test-mini", exact_model=True), timeout=5)
    assert (answer.model, answer.usage.estimated) == ("gpt-test-mini", False)
    expected = expected_micros(answer.usage, Fraction(1), Fraction(3))
    assert answer.usage.cost == pb.Cost(usd_micros=expected, estimated=True, price_unknown=True)
    record = (await stub.GetUsage(pb.GetUsageRequest(model="gpt-test-mini"), timeout=5)).records[0]
    assert record.cost == pb.Cost(usd_micros=expected, estimated=True, price_unknown=True)


async def test_the_usage_command_shows_the_cost_in_dollars(
    gateway_factory: GatewayFactory, primary: FakeUpstream, local: FakeUpstream
) -> None:
    gateway: Gateway = await gateway_factory(two_backends(primary, local, FAST_ROUTER + PRICING))
    target = f"127.0.0.1:{gateway.port}"

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb.LLMServiceStub(channel)
        answers = [await stub.Complete(chat(PROMPT * 50), timeout=5) for _ in range(3)]
        await stub.Complete(chat(PROMPT, model="openai/gpt-test-mini", exact_model=True), timeout=5)
    micros = sum(a.usage.cost.usd_micros for a in answers)
    process = await asyncio.create_subprocess_exec(
        BIN / "llmrelay", "--target", target, "usage", "--backend", "openai",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].split()[-2:] == ["cost", "(USD)"]
    (known,) = [line for line in lines if " gpt-test " in line]
    assert known.split()[-1] == f"{micros // 1_000_000}.{micros % 1_000_000:06d}"
    (unknown,) = [line for line in lines if " gpt-test-mini " in line]
    assert unknown.rstrip().endswith("(no price)") and " ~0." in unknown
    assert lines[-2:] == [
        "~ estimated: the gateway counted tokens, or the model has no known price",
        "(no price): counted at the gateway's unknown_price rate; the upstream's bill may differ",
    ]
