"""Shared start-up for the atheris fuzz targets in this directory (run each file as a script).

Each target is ``fuzz_NAME.py`` with a ``test_one_input(data)`` that must never raise anything
but the errors the parser promises; ``corpus/NAME/`` holds its seed inputs. See docs/hardening.md
for the short run in the test suite and the long run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(test_one_input: Callable[[bytes], None]) -> None:
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
