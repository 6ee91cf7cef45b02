"""Generate the client stubs from proto/ (the one way to do it: `make proto`).

Usage: gen_protos.py [--check]

Writes the Python stubs, with mypy-protobuf typings, into client/python/llmrelay/v1/; the Go stubs (protoc-gen-go and
protoc-gen-go-grpc) into client/go/llmrelay/v1/; the TypeScript stubs (ts-proto for @grpc/grpc-js), with the
google.rpc error details they decode, into client/node/src/gen/. Each language also gets the client service config
(proto/llmrelay/v1/llmrelay_grpc_service_config.json: the retry policy every SDK installs) as a string constant in a
source file of its stubs, so that one file decides how all three SDKs retry. With --check, generates into a scratch
folder and fails when the committed stubs differ, so stale stubs cannot land.

The Go and TypeScript generators come from `make tools` (scripts/install_tools.sh), pinned there and in
client/node/package-lock.json.
"""

from __future__ import annotations

import argparse
import filecmp
import functools
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PYTHON_OUT = ROOT / "client" / "python"
GO_OUT = ROOT / "client" / "go"
NODE_DIR = ROOT / "client" / "node"
TS_OUT = NODE_DIR / "src" / "gen"
PACKAGE = "llmrelay/v1"
SERVICE_CONFIG = PROTO_ROOT / PACKAGE / "llmrelay_grpc_service_config.json"
# Pinned so that regenerating on another machine gives the same bytes.
REQUIRED_VERSIONS = {"grpcio-tools": "1.85.1", "mypy-protobuf": "5.1.0"}
GO_MODULE = "github.com/llmrelay/llmrelay/client/go"
GO_PLUGINS = ("protoc-gen-go", "protoc-gen-go-grpc")
TS_PROTO_PLUGIN = NODE_DIR / "node_modules" / ".bin" / "protoc-gen-ts_proto"
# The google.rpc messages that failed calls carry, generated beside the contract for the TypeScript error helper.
GOOGLE_PROTOS = NODE_DIR / "node_modules" / "google-proto-files"
GOOGLE_RPC_FILES = ("google/rpc/status.proto", "google/rpc/error_details.proto")
TS_PROTO_OPTIONS = "outputServices=grpc-js,esModuleInterop=true,env=node"

INIT_TEXT = '''"""Generated stubs of the llmrelay.v1 contract. DO NOT EDIT: run `make proto`."""

from typing import TYPE_CHECKING

from llmrelay.v1.llmrelay_pb2 import *  # noqa: F403
from llmrelay.v1.llmrelay_pb2_grpc import LLMServiceServicer as LLMServiceServicer
from llmrelay.v1.llmrelay_pb2_grpc import LLMServiceStub as LLMServiceStub
from llmrelay.v1.llmrelay_pb2_grpc import add_LLMServiceServicer_to_server as add_LLMServiceServicer_to_server

if TYPE_CHECKING:
    # The stub's type on a grpc.aio channel, for annotations only.
    from llmrelay.v1.llmrelay_pb2_grpc import LLMServiceAsyncStub as LLMServiceAsyncStub
'''


@dataclass(frozen=True)
class Target:
    """One language's stubs: `generate(root)` writes them into `root / folder`, a folder that holds nothing else."""

    language: str
    root: Path
    folder: str
    generate: Callable[[Path], None]


def check_tool_versions() -> None:
    for dist, wanted in REQUIRED_VERSIONS.items():
        found = importlib.metadata.version(dist)
        if found != wanted:
            sys.exit(f"gen_protos: {dist} {found} is installed, {wanted} is pinned; run `make setup`")
    for plugin in GO_PLUGINS:
        if not (go_bin() / plugin).is_file():
            sys.exit(f"gen_protos: {plugin} is not installed at its pinned version; run `make tools`")
    locked = json.loads((NODE_DIR / "package-lock.json").read_text())["packages"]["node_modules/ts-proto"]["version"]
    installed_manifest = NODE_DIR / "node_modules" / "ts-proto" / "package.json"
    installed = json.loads(installed_manifest.read_text())["version"] if installed_manifest.is_file() else "none"
    if installed != locked or not GOOGLE_PROTOS.is_dir():
        sys.exit(f"gen_protos: ts-proto {installed} is installed, {locked} is locked; run `make tools`")


@functools.cache
def go_bin() -> Path:
    """The folder of the pinned Go tools, keyed by their versions (the tools need not be installed yet)."""
    script = ROOT / "scripts" / "install_tools.sh"
    out = subprocess.run(["bash", str(script), "--print-gobin"], check=True, capture_output=True, text=True).stdout
    return Path(out.strip())


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob(f"{PACKAGE}/*.proto"))


def protoc(*args: str) -> None:
    """Runs grpcio-tools' protoc, which adds the well-known types' include path itself."""
    contract = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", *args, *contract], check=True)


def generate_python(out: Path) -> None:
    bin_dir = Path(sys.executable).parent
    protoc(
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
    )
    write_init(out / PACKAGE)
    (out / PACKAGE / "service_config.py").write_text(
        '"""The client service config of llmrelay.v1 (its retry policy). DO NOT EDIT: run `make proto`."""\n\n'
        "from typing import Final\n\n"
        f'SERVICE_CONFIG_JSON: Final = """\\\n{service_config_text()}"""\n'
    )


def write_init(package_dir: Path) -> None:
    (package_dir / "__init__.py").write_text(INIT_TEXT)


def service_config_text() -> str:
    """The service config as JSON text, checked to parse, for embedding in each language's source."""
    text = SERVICE_CONFIG.read_text()
    json.loads(text)
    if "`" in text or '"""' in text or "\\" in text:
        sys.exit(f"gen_protos: {SERVICE_CONFIG} must not hold backquotes, triple quotes or backslashes")
    return text


def generate_go(out: Path) -> None:
    """Writes llmrelay/v1/*.pb.go, named by the proto's go_package inside the module at client/go."""
    tools = go_bin()
    protoc(
        *(f"--plugin={plugin}={tools / plugin}" for plugin in GO_PLUGINS),
        f"--go_out={out}",
        f"--go_opt=module={GO_MODULE}",
        f"--go-grpc_out={out}",
        f"--go-grpc_opt=module={GO_MODULE}",
    )
    (out / PACKAGE / "service_config.go").write_text(
        "// Code generated by scripts/gen_protos.py. DO NOT EDIT.\n\n"
        "package llmrelayv1\n\n"
        "// ServiceConfigJSON is the client service config of llmrelay.v1 (its retry policy),\n"
        "// for grpc.WithDefaultServiceConfig.\n"
        f"const ServiceConfigJSON = `{service_config_text()}`\n"
    )


def generate_typescript(out: Path) -> None:
    """Writes llmrelay/v1/llmrelay.ts, google/rpc/*.ts and the well-known types they import."""
    protoc(
        f"-I{GOOGLE_PROTOS}",
        f"--plugin=protoc-gen-ts_proto={TS_PROTO_PLUGIN}",
        f"--ts_proto_out={out}",
        f"--ts_proto_opt={TS_PROTO_OPTIONS}",
        *GOOGLE_RPC_FILES,
    )
    (out / PACKAGE / "service_config.ts").write_text(
        "// Code generated by scripts/gen_protos.py. DO NOT EDIT.\n\n"
        "/** The client service config of llmrelay.v1 (its retry policy), for the channel option\n"
        " * grpc.service_config. */\n"
        f"export const SERVICE_CONFIG_JSON = `{service_config_text()}`;\n"
    )


TARGETS = (
    Target("python", PYTHON_OUT, PACKAGE, generate_python),
    Target("go", GO_OUT, PACKAGE, generate_go),
    Target("typescript", TS_OUT, ".", generate_typescript),
)


def generated_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def stale_files(target: Target, scratch: Path) -> list[str]:
    out = scratch / target.language
    (out / target.folder).mkdir(parents=True)
    target.generate(out)
    fresh_dir, committed_dir = out / target.folder, target.root / target.folder
    fresh, committed = generated_files(fresh_dir), generated_files(committed_dir)
    stale = [p for p in fresh if p not in committed or not filecmp.cmp(fresh_dir / p, committed_dir / p, shallow=False)]
    stale += [p for p in committed if p not in fresh]
    return [str((committed_dir / p).relative_to(ROOT)) for p in stale]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed stubs are stale")
    check_only = parser.parse_args().check
    check_tool_versions()
    if not check_only:
        for target in TARGETS:
            if target.language != "python":
                # Wholly generated: start afresh so that nothing of a removed proto lingers.
                shutil.rmtree(target.root / target.folder, ignore_errors=True)
                (target.root / target.folder).mkdir(parents=True)
            target.generate(target.root)
        return
    with tempfile.TemporaryDirectory() as scratch:
        stale = [path for target in TARGETS for path in stale_files(target, Path(scratch))]
        if stale:
            sys.exit("gen_protos: stubs are stale (run `make proto` and commit): " + ", ".join(stale))
    print("gen_protos: stubs are up to date")


if __name__ == "__main__":
    main()
