"""The process's limit on open files, raised at start as far as the system lets it.

Each connection is a file: a caller's, an upstream's, the ledger's. A login shell, `make run` and many containers give
a process a soft limit of 1,024, under the 1,024 connections a backend's pool may open alone: past it, every new
connection failed (`Too many open files`), a busy upstream's pool and new callers alike. The hard limit, which only
an administrator may raise, is usually far higher (524,288 under systemd); the soft one is raised to it, as Go's
runtime does for every program."""

from __future__ import annotations

import logging
import resource
from typing import Final

from llmrelay_server.backends.upstream_http import POOL_LIMITS

CALLERS_AND_THE_REST: Final = 1024
"""Files beyond the backends' pools: callers' connections, the ledger, the logs."""

log = logging.getLogger(__name__)


def raise_open_files_limit(backends: int, *, say: bool) -> int:
    """Raises the soft limit on open files to the hard one (where that is unlimited, to what `backends` backends'
    pools and the callers may take); with `say`, a WARNING when the limit stays below that. The limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = backends * (POOL_LIMITS.max_connections or 0) + CALLERS_AND_THE_REST
    target = max(soft, wanted) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:  # a kernel's own ceiling (fs.nr_open) below the hard limit
            log.debug("open files limit not raised to %d: %s", target, error)
    if say and soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "the process may open %d files (ulimit -n; its hard limit %s), fewer than the %d that %d backends'"
            " connection pools (%d connections each) and callers may take: past it, new connections fail. Raise it"
            " (systemd LimitNOFILE=, docker --ulimit nofile=, ulimit -Hn)",
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            wanted,
            backends,
            POOL_LIMITS.max_connections,
        )
    return soft
