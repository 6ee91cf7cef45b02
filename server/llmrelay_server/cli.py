"""`llmrelay-server`: flags and environment -> configuration -> a running gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from llmrelay_server.app import ListenError, serve
from llmrelay_server.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmrelay-server", description="The llmrelay gRPC gateway.")
    parser.add_argument("--listen", metavar="HOST:PORT", help="where to serve gRPC (env LLMRELAY_LISTEN)")
    parser.add_argument("--config", metavar="FILE", help="a YAML configuration file (env LLMRELAY_CONFIG)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The HTTP client logs every request at INFO; that is noise on every agent step.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    try:
        # A flag is the most specific setting, so it overrides the environment as well as the file.
        env = {**os.environ, **({"LLMRELAY_LISTEN": args.listen} if args.listen else {})}
        config = load_config(env, path=args.config)
    except ConfigError as exc:
        sys.exit(f"llmrelay-server: configuration error: {exc}")
    try:
        asyncio.run(serve(config))
    except ListenError as exc:
        sys.exit(f"llmrelay-server: {exc}")


if __name__ == "__main__":
    main()
