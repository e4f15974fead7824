"""How hard the randomised tests try: a quick run by default, a deep one on demand.

The property tests (billing/tests/test_*_properties.py) replay random sequences against a real
EVM; each example costs one to three seconds of a core. The README's test command runs a few
examples of each, enough to exercise every operation; `GPGPU_TEST_DEPTH=deep` runs many more,
and CI does so in its own step (next to the API fuzzing), so the main suite stays short without
the deep runs being skipped anywhere. A failing example Hypothesis found is kept in its database
and replayed first on the next run, whatever the depth.
"""

from __future__ import annotations

import os

DEPTHS = ("quick", "deep")


def depth() -> str:
    value = os.environ.get("GPGPU_TEST_DEPTH", "quick")
    if value not in DEPTHS:
        raise ValueError(f"GPGPU_TEST_DEPTH is {value!r}: use one of {', '.join(DEPTHS)}")
    return value


def examples(*, quick: int, deep: int) -> int:
    """How many examples a property test draws at this depth."""
    return deep if depth() == "deep" else quick
