"""The usage ledger: what each backend, model and caller used and cost, kept in SQLite or PostgreSQL.

`ledger` records (journaled on disk on the request path, written in batches behind), `journal` keeps each process's
records on disk until the database has them, `store` is what a database must do, `sqlite` and `postgresql` do it.
"""

from llmrelay_server.usage.ledger import MANY_ROWS, UsageLedger, UsageTotals
from llmrelay_server.usage.store import LedgerStore, LedgerUnavailableError

__all__ = ["MANY_ROWS", "LedgerStore", "LedgerUnavailableError", "UsageLedger", "UsageTotals"]
