"""The SDK's public face: __all__ pinned, the typed completion options matching the contract's message, and the
package's dependency floors loading its generated code."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import llmrelay
import pytest
from llmrelay import CompletionOptions, RunToolsOptions
from llmrelay import v1 as pb
from llmrelay.v1 import llmrelay_pb2, llmrelay_pb2_grpc
from packaging.requirements import Requirement
from packaging.version import Version


def test_the_public_names() -> None:
    assert sorted(llmrelay.__all__) == sorted(
        [
            "BLOCKING_SERVICE_CONFIG", "DEFAULT_MAX_STEPS", "DEFAULT_SERVICE_CONFIG", "DEFAULT_TARGET",
            "DEFAULT_TIMEOUT_S", "USE_CLIENT_DEFAULT",
            "AbortedError", "Answer", "AsyncClient", "AsyncStream", "Client", "CompletionOptions", "ContextBudgetError",
            "Conversation", "DeadlineExceededError", "ErrorDetails", "FailedPreconditionError", "FieldViolation",
            "ImageDetail", "InvalidArgumentError", "LLMRelayError", "MessageLike", "NotFoundError", "OnInterrupt",
            "PermissionDeniedError", "QuotaViolation", "ReasoningEffort", "RegisteredTool", "ResourceExhaustedError",
            "RunToolsOptions", "StepLimitError", "Stream", "StreamAssembler", "Timeout", "ToolChoice", "Tools",
            "UnauthenticatedError", "UnavailableError", "error_details", "error_from_rpc", "image",
            "is_loopback_target", "json_schema", "json_schema_of", "message", "parameters_schema", "tool",
            "tool_result", "user_message", "uses_tls",
        ]
    )  # fmt: skip
    assert all(hasattr(llmrelay, name) for name in llmrelay.__all__)


def test_every_field_of_the_contracts_options_is_a_typed_keyword() -> None:
    fields = {f.name for f in pb.CompletionOptions.DESCRIPTOR.fields}
    assert set(CompletionOptions.__optional_keys__) == fields, "a field added to the contract needs its keyword"
    assert set(RunToolsOptions.__optional_keys__) == fields - {"tools"}


PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def _declared(extra: str | None = None) -> dict[str, Requirement]:
    """pyproject's requirements, by name: the package's own, or an extra's."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    listed = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {(requirement := Requirement(line)).name: requirement for line in listed}


def _floor(requirement: Requirement) -> Version:
    """The oldest version the requirement lets pip install (0 for a requirement without a floor)."""
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    return max(floors, default=Version("0"))


def _protobuf_gencode_version() -> Version:
    """The protobuf runtime the generated messages ask for as they are imported (protoc's gencode version): the same
    major version, and no older one."""
    source = Path(llmrelay_pb2.__file__).read_text()
    found = re.search(r"ValidateProtobufRuntimeVersion\(\s*[\w.]+,\s*(\d+),\s*(\d+),\s*(\d+),", source)
    assert found is not None, "the generated code checks the protobuf runtime's version"
    return Version(".".join(found.groups()))


@pytest.mark.parametrize("extra", [None, "server"], ids=["sdk", "server"])
def test_the_dependency_floors_load_the_generated_code(extra: str | None) -> None:
    """A floor under the generated code's own check let pip install the SDK beside a runtime that refuses to import
    it (protobuf>=6.31 for the messages protoc 7.35.1 made, grpcio>=1.85 for stubs that ask for 1.85.1): a
    regeneration with newer tools fails here until the floors move with it."""
    declared = _declared(extra)
    grpc_generated = Version(llmrelay_pb2_grpc.GRPC_GENERATED_VERSION)
    grpc_packages = [name for name in declared if name == "grpcio" or name.startswith("grpcio-")]
    assert grpc_packages, "grpcio's packages are declared"
    for name in grpc_packages:
        assert _floor(declared[name]) >= grpc_generated, f"{name}: the stubs need grpcio>={grpc_generated}"
    if extra is None:
        gencode = _protobuf_gencode_version()
        protobuf = declared["protobuf"].specifier
        assert _floor(declared["protobuf"]) >= gencode, f"protobuf: the messages need protobuf>={gencode}"
        assert Version(f"{gencode.major + 1}") not in protobuf, "nor another major version"
