"""GetUsage's request -> the ledger's query: filters as given, times in Unix seconds, invalid Timestamps named."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from llmrelay import v1 as pb
from llmrelay_server.convert import UsageQuery, usage_query
from llmrelay_server.domain import InvalidRequestError


def test_unset_fields_are_no_filter() -> None:
    assert usage_query(pb.GetUsageRequest()) == UsageQuery(None, None, None, None, None)


def test_filters_and_window_pass_through_with_times_in_whole_seconds_rounded_up() -> None:
    request = pb.GetUsageRequest(
        backend="ollama",
        model="tiny",
        caller="alice",
        start_time=Timestamp(seconds=-1, nanos=500_000_000),
        end_time=Timestamp(seconds=1_700_000_000, nanos=500_000_000),
    )

    # Minutes start on whole seconds: a bound between two means what the next one does.
    assert usage_query(request) == UsageQuery("ollama", "tiny", "alice", 0.0, 1_700_000_001.0)


@pytest.mark.parametrize("caller", ["", "a b", "x" * 129])
def test_a_caller_no_caller_can_be_is_a_violation(caller: str) -> None:
    # "" was taken as a filter that no caller matches: an empty answer, as if there were no usage, where the contract
    # says INVALID_ARGUMENT.
    with pytest.raises(InvalidRequestError) as caught:
        usage_query(pb.GetUsageRequest(caller=caller))
    assert [v.field for v in caught.value.violations] == ["caller"]


def test_a_bound_a_nanosecond_past_a_minutes_start_keeps_its_meaning() -> None:
    """As a float of seconds, 1_700_000_040 and a nanosecond is 1_700_000_040.0: the minute starting then would fall
    out of a window that ends a nanosecond after it."""
    request = pb.GetUsageRequest(end_time=Timestamp(seconds=1_700_000_040, nanos=1))
    assert usage_query(request).end == 1_700_000_041.0


@pytest.mark.parametrize(
    "timestamp",
    [Timestamp(seconds=253_402_300_799, nanos=999_999_999), Timestamp(seconds=-62_135_596_800)],
    ids=["9999-12-31T23:59:59.999999999Z", "0001-01-01T00:00:00Z"],
)
def test_the_ends_of_the_rfc_3339_range_are_valid(timestamp: Timestamp) -> None:
    query = usage_query(pb.GetUsageRequest(start_time=timestamp, end_time=timestamp))

    assert query.start == query.end == -(-timestamp.ToNanoseconds() // 10**9)


@pytest.mark.parametrize(
    "timestamp",
    [
        Timestamp(seconds=253_402_300_800),
        Timestamp(seconds=-62_135_596_801),
        Timestamp(nanos=1_000_000_000),
        Timestamp(nanos=-1),
    ],
    ids=["after-9999", "before-0001", "nanos-a-second", "nanos-negative"],
)
def test_timestamps_outside_it_are_violations_that_name_the_field(timestamp: Timestamp) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        usage_query(pb.GetUsageRequest(start_time=timestamp, end_time=timestamp))

    assert [v.field for v in caught.value.violations] == ["start_time", "end_time"]


@pytest.mark.parametrize("field", ["backend", "model"])
def test_an_empty_backend_or_model_is_a_violation(field: str) -> None:
    # Set to "" (an unset variable in a script), it was a filter nothing matches: an empty answer, as if no usage.
    with pytest.raises(InvalidRequestError) as caught:
        usage_query(pb.GetUsageRequest(backend="") if field == "backend" else pb.GetUsageRequest(model=""))
    assert [(v.field, v.description) for v in caught.value.violations] == [
        (field, f"must not be empty: leave it unset for every {field}")
    ]
