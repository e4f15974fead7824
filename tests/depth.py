"""How hard the randomised tests try (a quick run by default, a deep one on demand), and on
which EVMs the chain tests run.

The property tests (billing/tests/test_*_properties.py) replay random sequences against a real
EVM; each example costs one to three seconds of a core. The README's test command runs a few
examples of each, enough to exercise every operation; `GPGPU_TEST_DEPTH=deep` runs many more,
and CI does so in its own step (next to the API fuzzing), so the main suite stays short without
the deep runs being skipped anywhere. A failing example Hypothesis found is kept in its database
and replayed first on the next run, whatever the depth.

The chain tests can run against two EVMs: anvil (a real node, the one production talks to) and
eth-tester's in-process py-evm. Each costs about the same CPU per test, and running every chain
test on both doubled a fifth of the suite's time. The README's test command runs them on anvil;
`GPGPU_TEST_EVMS=eth-tester` (or `all`) picks the other or both, and CI runs the chain tests on
py-evm in a step of its own and the property tests on both in the deep step.
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


EVMS = ("anvil", "eth-tester")


def evms() -> tuple[str, ...]:
    """The EVMs the chain tests run on, from GPGPU_TEST_EVMS ("anvil" by default, "eth-tester",
    "all", or a comma-separated list)."""
    value = os.environ.get("GPGPU_TEST_EVMS", "anvil").strip()
    chosen = EVMS if value == "all" else tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in chosen if v not in EVMS]
    if unknown or not chosen:
        raise ValueError(f"GPGPU_TEST_EVMS is {value!r}: use all, or some of {', '.join(EVMS)}")
    return chosen
