"""Generate the client stubs from proto/ (the one way to do it: `make proto`).

Usage: gen_protos.py [--check]

Writes the Python stubs, with mypy-protobuf typings, into client/python/llmrelay/v1/. With --check, generates into
a scratch folder and fails when the committed stubs differ, so stale stubs cannot land.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PYTHON_OUT = ROOT / "client" / "python"
PACKAGE = "llmrelay/v1"
# Pinned so that regenerating on another machine gives the same bytes.
REQUIRED_VERSIONS = {"grpcio-tools": "1.85.1", "mypy-protobuf": "5.1.0"}

INIT_TEXT = '''"""Generated stubs of the llmrelay.v1 contract. DO NOT EDIT: run `make proto`."""

from llmrelay.v1.llmrelay_pb2 import *  # noqa: F403
from llmrelay.v1.llmrelay_pb2_grpc import LLMServiceServicer as LLMServiceServicer
from llmrelay.v1.llmrelay_pb2_grpc import LLMServiceStub as LLMServiceStub
from llmrelay.v1.llmrelay_pb2_grpc import add_LLMServiceServicer_to_server as add_LLMServiceServicer_to_server
'''


def check_tool_versions() -> None:
    for dist, wanted in REQUIRED_VERSIONS.items():
        found = importlib.metadata.version(dist)
        if found != wanted:
            sys.exit(f"gen_protos: {dist} {found} is installed, {wanted} is pinned; run `make setup`")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob(f"{PACKAGE}/*.proto"))


def generate_python(out: Path) -> None:
    bin_dir = Path(sys.executable).parent
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    subprocess.run(args, check=True)
    write_init(out / PACKAGE)


def write_init(package_dir: Path) -> None:
    (package_dir / "__init__.py").write_text(INIT_TEXT)


def generated_files(root: Path) -> list[Path]:
    return sorted(
        p.relative_to(root) for p in (root / PACKAGE).rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed stubs are stale")
    check_only = parser.parse_args().check
    check_tool_versions()
    if not check_only:
        generate_python(PYTHON_OUT)
        return
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        (out / PACKAGE).mkdir(parents=True)
        shutil.copy(PYTHON_OUT / "llmrelay" / "__init__.py", out / "llmrelay" / "__init__.py")
        generate_python(out)
        fresh, committed = generated_files(out), generated_files(PYTHON_OUT)
        stale = [str(p) for p in fresh if p not in committed or not filecmp.cmp(out / p, PYTHON_OUT / p, shallow=False)]
        stale += [str(p) for p in committed if p not in fresh]
        if stale:
            sys.exit("gen_protos: stubs are stale (run `make proto` and commit): " + ", ".join(stale))
    print("gen_protos: stubs are up to date")


if __name__ == "__main__":
    main()
