"""`make bench`, `make bench-instructions` and `make bench-litellm`. The gateways they measure start through the
tests' harness (tests/harness.py), the one that the tests, the demo and the SDKs' tests use: its folder goes on the
import path here, before any module of the bench imports it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
