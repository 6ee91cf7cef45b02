"""The price table: which pattern prices a model, local backends free, unknown prices counted, exact micro-dollars."""

from __future__ import annotations

import math
import sqlite3
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from llmrelay_server.config import Price
from llmrelay_server.domain import BackendSpec, Cost, TokenUsage
from llmrelay_server.pricing import OPENAI_PRICES, PriceTable, Rate
from llmrelay_server.usage import UsageLedger

UNKNOWN = Price(prompt=5.0, completion=15.0)


def backend(kind: str, name: str | None = None) -> BackendSpec:
    return BackendSpec(name=name or kind, kind=kind, base_url="http://upstream/v1", default_model="m")


OPENAI = backend("openai")
SHIPPED = PriceTable({}, UNKNOWN)


def priced(table: PriceTable, spec: BackendSpec, model: str) -> Rate:
    """The rate of an answer that names the model asked for."""
    return table.answer_rate(spec, model, model)


def micros(table: PriceTable, spec: BackendSpec, model: str, prompt: int = 1_000_000, completion: int = 0) -> int:
    return priced(table, spec, model).cost(TokenUsage(prompt, completion)).usd_micros


@pytest.mark.parametrize(
    ("model", "as_"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("o3-2025-04-16", "o3"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-4-0613", "gpt-4"),
    ],
)
def test_a_dated_snapshot_is_priced_as_its_model(model: str, as_: str) -> None:
    assert priced(SHIPPED, OPENAI, model) == priced(SHIPPED, OPENAI, as_)
    assert not priced(SHIPPED, OPENAI, model).unknown


def test_shipped_list_prices() -> None:
    assert OPENAI_PRICES["gpt-4o"] == Price(prompt=2.5, completion=10.0, cached_prompt=1.25)
    assert micros(SHIPPED, OPENAI, "gpt-4o", prompt=1_000_000, completion=1_000_000) == 12_500_000
    assert micros(SHIPPED, OPENAI, "gpt-4o-mini", prompt=1_000_000, completion=1_000_000) == 750_000
    assert micros(SHIPPED, OPENAI, "gpt-5-nano", prompt=1_000_000, completion=1_000_000) == 450_000


def test_a_named_snapshot_beats_the_date_pattern() -> None:
    # The first gpt-4o snapshot kept its launch price.
    assert micros(SHIPPED, OPENAI, "gpt-4o-2024-05-13") == 5_000_000
    assert micros(SHIPPED, OPENAI, "gpt-4o-2024-11-20") == 2_500_000


def test_variants_with_other_prices_are_not_taken_for_their_base_model() -> None:
    for model in ("gpt-4o-realtime-preview", "o3-deep-research", "gpt-4o-mini-search-preview"):
        assert priced(SHIPPED, OPENAI, model).unknown, model


def test_the_most_specific_pattern_wins_whatever_the_order() -> None:
    for prices in (
        {"gpt-*": Price(1.0, 1.0), "gpt-4o*": Price(2.0, 2.0), "gpt-4o-mini*": Price(3.0, 3.0)},
        {"gpt-4o-mini*": Price(3.0, 3.0), "gpt-4o*": Price(2.0, 2.0), "gpt-*": Price(1.0, 1.0)},
    ):
        table = PriceTable(prices, UNKNOWN)
        assert micros(table, OPENAI, "gpt-4o-mini-2024-07-18") == 3_000_000
        assert micros(table, OPENAI, "gpt-4o-2024-08-06") == 2_000_000
        assert micros(table, OPENAI, "gpt-3.5-turbo") == 1_000_000


def test_a_plain_name_beats_any_glob_and_backend_model_beats_the_name() -> None:
    table = PriceTable(
        {"openai/*": Price(1.0, 1.0), "gpt-x": Price(2.0, 2.0), "openai/gpt-x": Price(3.0, 3.0)},
        UNKNOWN,
    )
    assert micros(table, OPENAI, "gpt-x") == 3_000_000
    assert micros(table, backend("openai_compatible", "azure"), "gpt-x") == 2_000_000
    assert micros(table, OPENAI, "gpt-y") == 1_000_000


def test_equally_specific_globs_the_first_written_wins() -> None:
    table = PriceTable({"openai/*": Price(1.0, 1.0), "gpt-*": Price(2.0, 2.0)}, UNKNOWN)
    assert micros(table, OPENAI, "gpt-4o") == 1_000_000


def test_backend_model_patterns() -> None:
    table = PriceTable({"ollama/*": Price(prompt=0.5, completion=1.0), "gpu/Qwen/*": Price(0.2, 0.2)}, UNKNOWN)
    assert micros(table, backend("ollama"), "gpt-oss:20b") == 500_000
    assert micros(table, backend("vllm", "gpu"), "Qwen/Qwen2.5-7B") == 200_000
    # A model name may itself hold a slash (a vLLM model), and patterns match it as the name too.
    assert micros(PriceTable({"Qwen/*": Price(0.3, 0.3)}, UNKNOWN), backend("vllm"), "Qwen/Qwen2.5-7B") == 300_000


def test_a_model_named_as_another_backends_is_not_priced_as_that_backends() -> None:
    """Backend paid, which takes any name, asked for a model named "ollama/tiny": priced as ollama's tiny (free here),
    it passed any budget."""
    prices = {"ollama/tiny": Price(0.0, 0.0), "ollama/*": Price(0.0, 0.0), "gpt-4o": Price(2.5, 10.0)}
    table = PriceTable(prices, UNKNOWN, backends=["ollama", "paid"])
    paid = backend("openai_compatible", "paid")
    assert priced(table, paid, "ollama/tiny").unknown and priced(table, paid, "ollama/other").unknown
    assert micros(table, backend("openai_compatible", "ollama"), "tiny") == 0
    assert micros(table, paid, "gpt-4o") == 2_500_000  # a model's name alone still prices it on any backend
    assert micros(table, paid, "Qwen/x") == 5_000_000  # a name whose first part is no backend's: unknown, as before
    # A model the backend is configured with is its own, whatever its name (vLLM's beside a backend named openai).
    vllm = BackendSpec(name="gpu", kind="vllm", base_url="http://gpu/v1", default_model="openai/gpt-oss-20b")
    gpu_priced = PriceTable({"openai/gpt-oss-20b": Price(0.1, 0.5)}, UNKNOWN, backends=["openai", "gpu"])
    assert micros(gpu_priced, vllm, "openai/gpt-oss-20b") == 100_000


def test_yaml_overrides_beat_the_shipped_prices_and_add_models() -> None:
    table = PriceTable({"gpt-4o*": Price(prompt=1.0, completion=2.0), "my-model": Price(0.7, 0.7)}, UNKNOWN)
    # Even a glob of the operator's beats the shipped exact entry: the operator's figures are the ones they pay.
    assert micros(table, OPENAI, "gpt-4o") == 1_000_000
    assert micros(table, OPENAI, "gpt-4o-mini") == 1_000_000
    assert micros(table, OPENAI, "my-model") == 700_000
    assert micros(table, OPENAI, "gpt-4.1") == 2_000_000  # the rest of the shipped table stands


def test_an_override_of_a_model_prices_its_dated_snapshots_too() -> None:
    # OpenAI answers name the snapshot that served: an operator's price for "gpt-4o" must bill those answers, not the
    # list price (nor, for a model the shipped table lacks, the unknown rate).
    table = PriceTable(
        {"gpt-4o": Price(1.0, 1.0), "openai/my-model": Price(0.7, 0.7), "gpt-4.1-2025-04-14": Price(3.0, 3.0)}, UNKNOWN
    )
    assert micros(table, OPENAI, "gpt-4o-2024-08-06") == micros(table, OPENAI, "gpt-4o") == 1_000_000
    assert micros(table, OPENAI, "gpt-4o-2024-05-13") == 1_000_000, "over the shipped snapshot's own price too"
    assert micros(table, OPENAI, "my-model-0613") == 700_000
    assert not priced(table, OPENAI, "my-model-2025-01-01").unknown
    # A price written for the snapshot itself wins over its model's; variants that are no snapshot are not priced so.
    assert micros(table, OPENAI, "gpt-4.1-2025-04-14") == 3_000_000
    assert micros(table, OPENAI, "gpt-4o-mini-2024-07-18") == 150_000
    assert priced(table, OPENAI, "my-model-preview").unknown


def test_a_plain_names_snapshots_beat_a_catch_all_glob_as_the_plain_name_does() -> None:
    # Ranked as globs of their date, "o3"'s snapshots lost to "openai/*" (more literal characters): an answer naming
    # "o3-2025-04-16" was billed at the catch-all's price where its request reserved at o3's.
    claude = backend("anthropic")
    table = PriceTable(
        {
            "openai/*": Price(5.0, 15.0),
            "anthropic/claude-*": Price(3.0, 15.0),
            "o3": Price(2.0, 8.0),
            "gpt-4": Price(30.0, 60.0),
            "claude-opus-4-1": Price(15.0, 75.0),
            "openai/gpt-4-0613": Price(40.0, 80.0),
        },
        UNKNOWN,
    )
    assert micros(table, OPENAI, "o3-2025-04-16") == micros(table, OPENAI, "o3") == 2_000_000
    assert micros(table, claude, "claude-opus-4-1-20250805") == micros(table, claude, "claude-opus-4-1") == 15_000_000
    assert micros(table, OPENAI, "gpt-4-0314") == 30_000_000
    assert micros(table, OPENAI, "gpt-4-0613") == 40_000_000, "the snapshot's own price wins over its model's"
    assert table.rate(OPENAI, "o3").cost(TokenUsage(1_000_000, 0)).usd_micros == 2_000_000, "reserved as billed"
    assert micros(table, OPENAI, "o3-preview") == 5_000_000, "no snapshot: the catch-all's"


def test_a_price_of_a_claude_model_prices_its_snapshots_dated_without_dashes() -> None:
    # Anthropic writes a snapshot's date as YYYYMMDD: a price given for the plain name billed its answers as unknown.
    claude = backend("anthropic")
    table = PriceTable({"claude-test": Price(3.0, 15.0)}, UNKNOWN)
    assert priced(table, claude, "claude-test-20250929") == priced(table, claude, "claude-test")
    assert not priced(table, claude, "claude-test-20250929").unknown
    assert priced(table, claude, "claude-test-2025092").unknown, "seven digits are no date"


@pytest.mark.parametrize("kind", ["ollama", "llamacpp", "vllm"])
def test_local_backends_are_free_whatever_the_model(kind: str) -> None:
    for model in ("gpt-oss:20b", "gpt-4o", "anything"):
        rate = priced(SHIPPED, backend(kind), model)
        assert not rate.unknown
        assert rate.cost(TokenUsage(10_000, 10_000)) == Cost(0)


def test_a_price_in_yaml_makes_a_local_backend_paid() -> None:
    table = PriceTable({"ollama/*": Price(prompt=0.1, completion=0.1)}, UNKNOWN)
    assert micros(table, backend("ollama"), "tiny") == 100_000
    assert micros(table, backend("vllm"), "tiny") == 0


@pytest.mark.parametrize("kind", ["openai", "openai_compatible"])
def test_an_unknown_model_on_a_paid_backend_is_flagged_and_counted_at_the_default_rate(kind: str) -> None:
    rate = priced(SHIPPED, backend(kind), "mystery-model")
    assert rate.unknown
    cost = rate.cost(TokenUsage(prompt_tokens=1_000, completion_tokens=100))
    # 1000 * 5.0 + 100 * 15.0 micro-USD: budgets count it, though no upstream bills this figure.
    assert cost == Cost(usd_micros=6_500, estimated=True, price_unknown=True)


def test_an_answer_naming_another_model_costs_its_price_where_known_else_the_askeds() -> None:
    """An answer was priced by the name it gave alone: a deployment the operator priced ("prod-4o", answering as
    "gpt-4o-2024-08-06") at the shipped gpt-4o price, and "gpt-test" answered as "gpt-test-latest" at the unknown
    price, three times what its budget had reserved."""
    table = PriceTable(
        {"prod-4o": Price(100.0, 100.0), "gpt-test": Price(1.0, 1.0), "gpt-test-2024-05-13": Price(2.0, 2.0)}, UNKNOWN
    )

    def answered(asked: str, answer: str) -> int:
        return table.answer_rate(OPENAI, asked, answer).cost(TokenUsage(1_000_000, 0)).usd_micros

    assert answered("prod-4o", "gpt-4o-2024-08-06") == 100_000_000  # the operator's, not the shipped 2.5
    assert answered("gpt-test", "gpt-test-latest") == 1_000_000  # the asked's, not the unknown 5
    assert answered("gpt-test", "gpt-test-2024-05-13") == 2_000_000  # a snapshot priced apart: its own
    assert answered("gpt-4o", "gpt-4o-2024-05-13") == 5_000_000  # the shipped snapshot's own
    assert answered("mystery", "mystery-latest") == 5_000_000  # neither known
    assert table.answer_rate(OPENAI, "mystery", "mystery-latest").unknown
    assert SHIPPED.answer_rate(backend("ollama"), "tiny", "gpt-4o").cost(TokenUsage(1_000_000, 0)).usd_micros == 0


def test_a_request_reserves_at_the_dearest_of_its_models_snapshots_priced_apart() -> None:
    """An answer to "gpt-4o" that names "gpt-4o-2024-05-13" (its launch price, twice gpt-4o's) is billed at its price:
    reserved at gpt-4o's, callers sharing a budget spent past it between them."""
    table = PriceTable(
        {"openai/gpt-test-2025-01-01": Price(3.0, 1.0), "gpt-test": Price(1.0, 2.0)}, UNKNOWN, ["openai"]
    )

    assert SHIPPED.rate(OPENAI, "gpt-4o") == priced(SHIPPED, OPENAI, "gpt-4o-2024-05-13")
    assert SHIPPED.rate(OPENAI, "gpt-4o-2024-08-06") == priced(SHIPPED, OPENAI, "gpt-4o")  # a snapshot has none
    assert SHIPPED.rate(OPENAI, "gpt-4o-mini") == priced(SHIPPED, OPENAI, "gpt-4o-mini")
    dearest = table.rate(OPENAI, "gpt-test")  # price by price: the snapshot's prompt, the model's completion
    assert (dearest.prompt, dearest.completion, dearest.unknown) == (Fraction(3), Fraction(2), False)
    assert table.rate(OPENAI, "gpt-4o") == priced(table, OPENAI, "gpt-4o-2024-05-13")
    overridden = PriceTable({"gpt-4o": Price(1.0, 1.0)}, UNKNOWN)  # its snapshots too: none dearer
    assert overridden.rate(OPENAI, "gpt-4o") == priced(overridden, OPENAI, "gpt-4o")
    assert SHIPPED.rate(backend("ollama"), "gpt-4o").estimate_usd_micros(1_000, 1_000) == 0


def test_exact_micro_dollars_with_cached_prompt_tokens() -> None:
    rate = Rate.of(Price(prompt=2.5, completion=10.0, cached_prompt=1.25))
    usage = TokenUsage(prompt_tokens=1_234, completion_tokens=567, cached_prompt_tokens=1_000)
    # 1000 cached * 1.25 + 234 * 2.5 + 567 * 10 = 1250 + 585 + 5670
    assert rate.cost(usage) == Cost(usd_micros=7_505)


def test_cache_writes_at_their_own_rate_and_no_prompt_token_billed_twice() -> None:
    rate = Rate.of(Price(prompt=3.0, completion=15.0, cached_prompt=0.3, cache_write_prompt=3.75))
    usage = TokenUsage(1_000, 10, cached_prompt_tokens=200, cache_write_prompt_tokens=500)
    # 300 fresh * 3 + 500 written * 3.75 + 200 read * 0.3 + 10 * 15 = 900 + 1875 + 60 + 150
    assert rate.cost(usage).usd_micros == 2_985
    # Reads and writes past the prompt (no upstream's figures): the reads first, the writes what they leave.
    assert rate.cost(TokenUsage(100, 0, cached_prompt_tokens=80, cache_write_prompt_tokens=80)).usd_micros == 99
    # Unset, the writes cost the prompt rate.
    assert Rate.of(Price(prompt=3.0, completion=0.0)).cost(TokenUsage(100, 0, cache_write_prompt_tokens=40)) == Cost(
        usd_micros=300
    )


def test_an_estimate_bounds_a_prompt_written_to_the_cache_whole() -> None:
    # A budget reserves the most a call may cost: every prompt token may be a cache write, dearer than the prompt.
    dearer_writes = Rate.of(Price(prompt=3.0, completion=15.0, cache_write_prompt=3.75))
    assert dearer_writes.estimate_usd_micros(1_000, 10) == 3_750 + 150
    assert (
        dearer_writes.estimate_usd_micros(1_000, 10)
        >= dearer_writes.cost(TokenUsage(1_000, 10, cache_write_prompt_tokens=1_000)).usd_micros
    )
    cheaper_writes = Rate.of(Price(prompt=3.0, completion=15.0, cache_write_prompt=1.0))
    assert cheaper_writes.estimate_usd_micros(1_000, 10) == 3_000 + 150
    # A model reserves at the dearest of its own and its snapshots' prices, price by price.
    snapshot = Price(3.0, 15.0, cache_write_prompt=5.5)
    table = PriceTable({"claude-x-20250929": snapshot, "claude-x": Price(4.0, 1.0)}, UNKNOWN)
    dearest = table.rate(backend("anthropic"), "claude-x")
    assert (dearest.prompt, dearest.cache_write_prompt) == (Fraction(4), Fraction("5.5"))
    assert dearest.estimate_usd_micros(1_000, 0) == 5_500


def test_cached_tokens_at_the_prompt_rate_when_no_cached_rate_is_set() -> None:
    rate = Rate.of(Price(prompt=3.0, completion=0.0))
    assert rate.cost(TokenUsage(100, 0, cached_prompt_tokens=40)).usd_micros == 300


def test_decimal_prices_are_exact_and_rounded_once_up() -> None:
    # 0.15 and 0.075 are not exact as binary floats; summed as floats these would drift.
    rate = Rate.of(Price(prompt=0.15, completion=0.6, cached_prompt=0.075))
    assert rate.prompt == Fraction(3, 20)
    assert rate.cost(TokenUsage(prompt_tokens=10, completion_tokens=0)).usd_micros == 2  # 1.5 -> 2
    assert rate.cost(TokenUsage(prompt_tokens=20, completion_tokens=0)).usd_micros == 3  # exact
    # Never free where there is a price: 0.45 would round half up to 0, and pass a spent budget as a free call does.
    assert rate.cost(TokenUsage(prompt_tokens=3, completion_tokens=0)).usd_micros == 1
    # 0.075 * 2 + 0.15 * 1 + 0.6 * 1 = 0.9, rounded once (per part it would be 1 + 1 + 1 = 3).
    assert rate.cost(TokenUsage(prompt_tokens=3, completion_tokens=1, cached_prompt_tokens=2)).usd_micros == 1
    assert rate.cost(TokenUsage(prompt_tokens=0, completion_tokens=0)).usd_micros == 0


def test_cached_tokens_never_exceed_the_prompt() -> None:
    rate = Rate.of(Price(prompt=2.0, completion=0.0, cached_prompt=1.0))
    assert rate.cost(TokenUsage(prompt_tokens=10, completion_tokens=0, cached_prompt_tokens=50)).usd_micros == 10


@given(
    prompt=st.integers(0, 10**9),
    completion=st.integers(0, 10**9),
    prompt_price=st.integers(0, 10**6),
    completion_price=st.integers(0, 10**6),
)
def test_cost_is_the_exact_product_rounded_up(
    prompt: int, completion: int, prompt_price: int, completion_price: int
) -> None:
    # Prices in thousandths of a dollar per million tokens, written as decimals as in YAML.
    rate = Rate.of(Price(prompt=prompt_price / 1000, completion=completion_price / 1000))
    exact = Fraction(prompt * prompt_price + completion * completion_price, 1000)
    expected = math.ceil(exact)
    assert rate.cost(TokenUsage(prompt, completion)).usd_micros == expected
    assert rate.estimate_usd_micros(prompt, completion) == expected


def test_estimated_tokens_give_an_estimated_cost() -> None:
    rate = priced(SHIPPED, OPENAI, "gpt-4o")
    assert rate.cost(TokenUsage(10, 10, estimated=True)) == Cost(usd_micros=125, estimated=True)
    assert rate.cost(TokenUsage(10, 10)) == Cost(usd_micros=125)


def test_estimate_for_admission() -> None:
    assert priced(SHIPPED, OPENAI, "gpt-4.1").estimate_usd_micros(1_000, 500) == 6_000  # 1000 * 2 + 500 * 8
    assert priced(SHIPPED, backend("ollama"), "gpt-oss:20b").estimate_usd_micros(1_000, 500) == 0
    assert priced(SHIPPED, OPENAI, "mystery").estimate_usd_micros(1_000, 500) == 12_500  # the default rate


def test_adding_costs() -> None:
    assert Cost(5) + Cost(7, estimated=True) == Cost(12, estimated=True)
    assert Cost(1, price_unknown=True, estimated=True) + Cost(2) == Cost(3, estimated=True, price_unknown=True)
    priced = TokenUsage(10, 5, cost=Cost(100))
    unpriced = TokenUsage(1, 1)
    assert (priced + unpriced).cost == Cost(100)
    assert (unpriced + priced).cost == Cost(100)
    assert (unpriced + unpriced).cost is None
    assert (priced + TokenUsage(2, 2, estimated=True, cost=Cost(9, estimated=True))).cost == Cost(109, estimated=True)


# --- the ledger keeps what answers cost -------------------------------------------------------------------------


async def test_the_ledger_sums_costs_and_counts_estimated_and_unpriced_requests(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path / "usage.db")
    ledger.record("openai", "gpt-4o", "c", TokenUsage(10, 5, cost=Cost(1_000)))
    ledger.record("openai", "gpt-4o", "c", TokenUsage(10, 5, estimated=True, cost=Cost(700, estimated=True)))
    await ledger.flush()
    ledger.record("openai", "gpt-4o", "c", TokenUsage(1, 1, cost=Cost(33, estimated=True, price_unknown=True)))
    ledger.record("openai", "gpt-4o", "c", TokenUsage(1, 1))  # unpriced: no cost to add
    (totals,) = await ledger.query()  # flushed and buffered records alike
    await ledger.aclose()
    assert (totals.requests, totals.cost_usd_micros) == (4, 1_733)
    assert (totals.cost_estimated_requests, totals.price_unknown_requests) == (2, 1)


async def test_a_ledger_from_before_costs_gets_the_columns_with_zeros(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE usage_buckets (backend TEXT NOT NULL, model TEXT NOT NULL, caller TEXT NOT NULL,"
            " bucket_start INTEGER NOT NULL, requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,"
            " completion_tokens INTEGER NOT NULL, total_tokens INTEGER NOT NULL, estimated_requests INTEGER NOT NULL,"
            " PRIMARY KEY (backend, model, caller, bucket_start)) WITHOUT ROWID"
        )
        connection.execute("INSERT INTO usage_buckets VALUES ('openai', 'gpt-4o', 'c', 0, 2, 20, 10, 30, 0)")
    connection.close()
    ledger = UsageLedger(path)
    ledger.record("openai", "gpt-4o", "c", TokenUsage(10, 5, cost=Cost(125)), at=0)
    await ledger.flush()
    (totals,) = await ledger.query()
    await ledger.aclose()
    assert (totals.requests, totals.total_tokens, totals.cost_usd_micros, totals.interrupted_requests) == (
        3,
        45,
        125,
        0,
    )
