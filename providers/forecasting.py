"""Idle forecasts: how long a machine's idle stretch will last, learnt from its own history.

Plain code over plain data (no ORM): the marketplace keeps one `StretchCounts` per machine, and
one for the whole fleet as the prior, updated from heartbeat history (providers.idle_history);
the matcher and the trace-replay simulator ask the same questions of the same code.

A *stretch* is a maximal run of time in which the machine's owner leaves its GPUs alone (idle,
or leased to a renter). It ends when the owner comes back (an *ended* stretch, its length
observed) or when what we know of it stops without the owner coming back (*censored*: the
machine went offline, or the stretch is still running). Each stretch is counted in the hour of
the week (UTC, Monday 00:00 = 0) in which it began, in one of `BIN_EDGES_S`' duration bins.

The question the matcher asks (`Forecast.survival`): a machine idle for `age` seconds, since a
stretch that began in hour-of-week `h`: what is the probability that it stays idle another `d`
seconds? That is S(age + d) / S(age), where S is the survival function of stretch lengths,
estimated per bin as Kaplan-Meier does (hazard in a bin = stretches ended in it ÷ stretches at
risk at its start; censored ones count as at risk up to their bin) and interpolated
log-linearly inside a bin (a constant hazard rate within each bin).

Where a machine's data for hour-of-week `h` is thin, its counts are blended with its counts of
the same hour of day on every day of the week, those with its own all-hours counts, and those
with the fleet prior, each level scaled to a fixed weight in stretches (`HOUR_PRIOR_WEIGHT`,
`FLEET_PRIOR_WEIGHT`): a new machine is forecast as the fleet; a machine with days of history
by its daily habits at that hour (owners keep days more than weeks); one with weeks of history
mostly as itself at that hour of that weekday. Counts decay (`StretchCounts.decay`), so a
machine whose owner changes habits is forecast by its recent weeks; storage is bounded: at most
168 × len(bins) × 2 numbers per machine, kept sparse.

Counts by hour mix an hour's stretches together: an owner who steps away for minutes all
morning and for the afternoon from 13:00 looks, at 13:02, like one more short stretch.
`Analogs` keeps the machine's recent stretches themselves and reads this one from the stretches
that began at about the same time on the days before (the one whose day lines up with today's
stretches so far), with a calibration learnt from its own past
that says how far to trust that reading; the matcher (marketplace.placement, v2) takes the
longer of the two horizons.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import accumulate, pairwise
from operator import add
from typing import Any

# Duration bins of stretch lengths, seconds: log-spaced from a minute to a week. The last bin is
# open-ended (a stretch longer than a week is counted in it).
BIN_EDGES_S: tuple[float, ...] = (
    0,
    60,
    120,
    180,
    300,
    450,
    600,
    900,
    1200,
    1800,
    2700,
    3600,
    5400,
    7200,
    10800,
    14400,
    21600,
    28800,
    43200,
    86400,
    172800,
    604800,
)
NBINS = len(BIN_EDGES_S)  # bin i covers [BIN_EDGES_S[i], BIN_EDGES_S[i+1]); the last is open
_FINITE_WIDTHS_S: tuple[float, ...] = tuple(float(b - a) for a, b in pairwise(BIN_EDGES_S))  # all but the open bin
# A bin's share of ended stretches is capped below 1, so its hazard rate stays finite.
_Q_MAX = 0.999999
HOURS_OF_WEEK = 168
# Weight, in stretches, of the machine's all-hours counts blended into one hour's counts, and of
# the fleet prior blended into the machine's.
HOUR_PRIOR_WEIGHT = 4.0
FLEET_PRIOR_WEIGHT = 3.0
# Hazard rate beyond the last edge (per second): a stretch over a week ends within about a week.
_TAIL_RATE = 1.0 / 604800
_A_MONDAY = 4 * 86400  # 1970-01-05 00:00 UTC, a Monday, as a Unix time


def hour_of_week(at: datetime | float) -> int:
    """0..167: Monday 00:00 UTC is 0. `at` is an aware datetime or a Unix time in seconds."""
    if isinstance(at, datetime):
        when = at.astimezone(UTC)
        return when.weekday() * 24 + when.hour
    # Arithmetic, not datetime: the matcher asks this of every free GPU in every cycle.
    return int((at - _A_MONDAY) // 3600) % HOURS_OF_WEEK


def bin_of(length_s: float) -> int:
    """The bin a stretch of `length_s` seconds falls in."""
    if length_s <= 0:
        return 0
    # The first edge is 0, so a positive length is at or past it: never below bin 0, and
    # bisect_right is at most NBINS (the last, open bin).
    return bisect_right(BIN_EDGES_S, length_s) - 1


@dataclass
class StretchCounts:
    """Counts of stretches by (hour of week, duration bin): `ended[h][b]`, `censored[h][b]`,
    stored sparse ({hour: {bin: count}}). Counts are floats (they decay)."""

    ended: dict[int, dict[int, float]] = field(default_factory=dict)
    censored: dict[int, dict[int, float]] = field(default_factory=dict)
    # profile(hour) answers, dropped by merge/decay and, for the stretch's hour, by add (which
    # counts the all-hours answer up in place); a fleet prior is read for every machine's
    # forecast, and summing its 168 hours each time would dominate. Code that edits
    # `ended`/`censored` directly must call `changed()`.
    _profiles: dict[int | None, tuple[list[float], list[float]]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # scaled(weight) answers, dropped by every change (a fleet prior, read by every machine's new
    # forecast, changes only when it is rebuilt).
    _scaled_profiles: dict[float, tuple[list[float], list[float]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def changed(self) -> None:
        """Forget cached profiles (after editing `ended` or `censored` in place)."""
        self._profiles.clear()
        self._scaled_profiles.clear()

    def add(self, *, began_hour: int, length_s: float, ended: bool, weight: float = 1.0) -> None:
        """Count one stretch that began in hour-of-week `began_hour` and lasted `length_s`
        (ended by the owner's return when `ended`, else censored at that length)."""
        if not 0 <= began_hour < HOURS_OF_WEEK:
            raise ValueError(f"began_hour must be 0..167, not {began_hour}")
        if not 0 <= length_s < math.inf:  # NaN fails both
            raise ValueError(f"length_s must be a finite number of seconds >= 0, not {length_s}")
        table = self.ended if ended else self.censored
        row = table.get(began_hour)
        if row is None:
            row = table[began_hour] = {}
        b = bin_of(length_s)
        row[b] = row.get(b, 0.0) + weight
        # Only this hour's profile and the all-hours one change: the latter is kept, counted up
        # here (rebuilding it sums every hour, and each new forecast of the machine reads it).
        self._profiles.pop(began_hour, None)
        every_hour = self._profiles.get(None)
        if every_hour is not None:
            every_hour[0 if ended else 1][b] += weight
        if self._scaled_profiles:
            self._scaled_profiles.clear()

    def merge(self, other: StretchCounts, weight: float = 1.0) -> None:
        for mine, theirs in ((self.ended, other.ended), (self.censored, other.censored)):
            for hour, row in theirs.items():
                target = mine.setdefault(hour, {})
                for b, n in row.items():
                    target[b] = target.get(b, 0.0) + n * weight
        self.changed()

    def decay(self, factor: float, *, floor: float = 0.01) -> None:
        """Multiply every count by `factor` (0 < factor <= 1), dropping counts below `floor`."""
        if not 0 < factor <= 1:
            raise ValueError("factor must be in (0, 1]")
        for table in (self.ended, self.censored):
            for hour in list(table):
                row = {b: n * factor for b, n in table[hour].items() if n * factor >= floor}
                if row:
                    table[hour] = row
                else:
                    del table[hour]
        self.changed()

    def total(self, hour: int | None = None) -> float:
        tables = (self.ended, self.censored)
        if hour is None:
            return sum(n for table in tables for row in table.values() for n in row.values())
        return sum(n for table in tables for n in table.get(hour, {}).values())

    def profile(self, hour: int | None = None) -> tuple[list[float], list[float]]:
        """(ended per bin, censored per bin) for one hour of the week, or summed over all.
        The lists are fresh copies (the cache keeps its own)."""
        found = self._view(hour)
        return list(found[0]), list(found[1])

    def _view(self, hour: int | None) -> tuple[list[float], list[float]]:
        """`profile(hour)` as kept: not to be changed by the caller."""
        found = self._profiles.get(hour)
        if found is None:
            found = self._profiles[hour] = self._profile(hour)
        return found

    def scaled(self, weight: float) -> tuple[list[float], list[float]]:
        """The all-hours profile scaled to a total of `weight` stretches (zeros when there are
        none), as kept: not to be changed by the caller."""
        found = self._scaled_profiles.get(weight)
        if found is None:
            found = self._scaled_profiles[weight] = _scaled(self._view(None), weight)
        return found

    def _profile(self, hour: int | None) -> tuple[list[float], list[float]]:
        ended = [0.0] * NBINS
        censored = [0.0] * NBINS
        hours: Iterable[int] = sorted(self.ended.keys() | self.censored.keys()) if hour is None else (hour,)
        for h in hours:
            for b, n in self.ended.get(h, {}).items():
                ended[b] += n
            for b, n in self.censored.get(h, {}).items():
                censored[b] += n
        return ended, censored

    # storage: {"e": {"h": {"b": n}}, "c": {...}} with string keys (JSON)
    def to_json(self) -> dict[str, dict[str, dict[str, float]]]:
        def dump(table: dict[int, dict[int, float]]) -> dict[str, dict[str, float]]:
            return {str(h): {str(b): round(n, 4) for b, n in row.items()} for h, row in table.items() if row}

        return {"e": dump(self.ended), "c": dump(self.censored)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> StretchCounts:
        """Counts stored by `to_json`; entries out of range or not numbers are refused."""
        counts = cls()
        if not data:
            return counts
        for key, table in (("e", counts.ended), ("c", counts.censored)):
            for hour_text, row in (data.get(key) or {}).items():
                hour = int(hour_text)
                if not 0 <= hour < HOURS_OF_WEEK:
                    raise ValueError(f"hour {hour} out of range")
                parsed: dict[int, float] = {}
                for bin_text, n in row.items():
                    b, value = int(bin_text), float(n)
                    if not 0 <= b < NBINS or not math.isfinite(value) or value < 0:
                        raise ValueError(f"bad count {bin_text}: {n}")
                    parsed[b] = value
                table[hour] = parsed
        return counts


def _scaled(profile: tuple[list[float], list[float]], weight: float) -> tuple[list[float], list[float]]:
    ended, censored = profile
    total = sum(ended) + sum(censored)
    if total <= 0:
        return [0.0] * NBINS, [0.0] * NBINS
    k = weight / total
    return [n * k for n in ended], [n * k for n in censored]


def _add(a: tuple[list[float], list[float]], b: tuple[list[float], list[float]]) -> tuple[list[float], list[float]]:
    return [x + y for x, y in zip(a[0], b[0], strict=True)], [x + y for x, y in zip(a[1], b[1], strict=True)]


def _add_hour(into: tuple[list[float], list[float]], counts: StretchCounts, hour: int) -> None:
    """Add one hour's counts to a profile, in place: what `_add(counts.profile(hour), into)`
    gives, without building the hour's profile (an hour's rows are sparse)."""
    for target, table in ((into[0], counts.ended), (into[1], counts.censored)):
        row = table.get(hour)
        if row:
            for b, n in row.items():
                target[b] += n


# A stretch profile nobody has measured: a mean of about an hour, as a constant hazard.
_UNKNOWN_RATE = 1.0 / 3600


@dataclass(frozen=True)
class Survival:
    """S at each bin edge (S[0] = 1, non-increasing) and each bin's constant hazard rate."""

    at_edges: tuple[float, ...]
    rates: tuple[float, ...]

    def __call__(self, t: float) -> float:
        """P(a stretch lasts at least t seconds)."""
        if t <= 0:
            return 1.0
        b = bin_of(t)
        return self.at_edges[b] * math.exp(-self.rates[b] * (t - BIN_EDGES_S[b]))

    def conditional(self, age_s: float, more_s: float) -> float:
        """P(still idle `more_s` seconds from now | idle for `age_s` seconds already)."""
        base = self(age_s)
        if base <= 1e-12:
            # Beyond anything seen: the tail's rate alone.
            return math.exp(-self.rates[-1] * max(more_s, 0.0))
        return min(1.0, self(age_s + max(more_s, 0.0)) / base)

    def quantile_more(self, age_s: float, p: float) -> float:
        """The `d` with P(still idle after d more seconds | age) = p (p in (0, 1)): p=0.5 is the
        median remaining stretch, capped at 4 weeks. Solved in closed form: S is log-linear
        inside each bin, so the bin where S falls to p·S(age) is found by a walk over the edges
        and the time inside it by one logarithm."""
        cap = 4 * 604800.0
        if not 0 < p < 1:
            raise ValueError(f"p must be in (0, 1), not {p}")
        age = max(age_s, 0.0)
        base = self(age)
        if base <= 1e-12:
            rate = self.rates[-1]
            return min(cap, -math.log(p) / rate) if rate > 0 else cap
        target = p * base
        b = bin_of(age)
        # The first bin after age's whose end falls below target holds the answer.
        while b < NBINS - 1 and self.at_edges[b + 1] >= target:
            b += 1
        start = max(BIN_EDGES_S[b], age)
        at_start = base if start == age else self(start)  # the same answer, one call fewer
        rate = self.rates[b]
        if rate <= 0:
            return cap
        t = start + math.log(at_start / target) / rate
        return min(cap, max(t - age, 0.0))

    @classmethod
    def from_profile(cls, ended: list[float], censored: list[float]) -> Survival:
        # Stretches at risk at each bin's start: the counts of it and every later bin (summed
        # from the last bin down). A forecast is built for every idle stretch a GPU begins, so
        # this is written for speed; the arithmetic is the plain loop's, step for step.
        risk = list(accumulate(map(add, reversed(ended), reversed(censored))))
        risk.reverse()
        edges = [1.0]
        rates: list[float] = []
        s = 1.0
        rate = _UNKNOWN_RATE  # a bin nobody was at risk in keeps the rate before it
        log, exp = math.log, math.exp
        for b, width in enumerate(_FINITE_WIDTHS_S):
            at_risk = risk[b]
            if at_risk > 0:
                # Censored stretches of this bin were at risk for about half of it.
                exposed = at_risk - censored[b] / 2
                q = ended[b] / exposed if exposed > 0 else 0.0
                rate = -log(1 - (q if q <= _Q_MAX else _Q_MAX)) / width
            rates.append(rate)
            s *= exp(-rate * width)
            edges.append(s)
        at_risk = risk[-1]
        if at_risk > 0:  # the last, open bin
            exposed = at_risk - censored[-1] / 2
            q = ended[-1] / exposed if exposed > 0 else 0.0
            rate = max(_TAIL_RATE, (q if q <= _Q_MAX else _Q_MAX) / 604800)
        rates.append(rate)
        return cls(tuple(edges), tuple(rates))


_ALL_HOURS = HOURS_OF_WEEK  # Forecast._cache's key of the all-hours curve; +1+h: hour of day h's


# --- analogs: the same time on the days before ------------------------------------------------

# The probability at which the matcher's horizons are drawn (marketplace.placement.P_TARGET): an
# owner is still away at a GPU's safe-until with this probability; analogs are calibrated to it.
SAFE_P = 0.8

# Lags, in days, at which a machine's own past is read as an analog of now.
ANALOG_LAGS_D: tuple[int, ...] = (1, 2, 3)
# What a machine keeps of its ended stretches for analogs, counted back from the latest one's end:
# the longest lag, a day to calibrate the readings of its first stretches, and the window.
ANALOG_KEEP_S = 4 * 86400.0 + 3600.0
# Stretches shorter than this are not kept (an owner away this briefly is not rented: a time
# no kept stretch covers reads as the owner at the machine, which it practically was).
ANALOG_SHORTEST_S = 120.0
# At most this many kept stretches (the latest): a machine's storage stays bounded whatever its
# GPUs and owners do.
ANALOG_MAX_STRETCHES = 1000
# An analog of a stretch is a kept stretch that began near the same time on a day before: of
# those within ANALOG_SHIFT_MAX_S, the one under whose shift of that day the most of the
# ANALOG_ALIGN_STRETCHES stretches just before the current one line up too (a stretch of that
# day began and ended with each within ANALOG_ALIGN_TOLERANCE_S), the nearest of those; one
# further than ANALOG_WINDOW_S only where at least ANALOG_FAR_LINED_UP line up. An owner whose
# whole day runs early or late by a different amount each day is thereby read by the stretch
# that plays the same part in the day, not by whichever began nearest the clock time.
ANALOG_WINDOW_S = 3600.0
ANALOG_SHIFT_MAX_S = 3 * 3600.0
ANALOG_ALIGN_STRETCHES = 8
ANALOG_FAR_LINED_UP = 6
ANALOG_ALIGN_TOLERANCE_S = 120.0
# Calibration: each kept stretch is judged at this age (when a GPU becomes rentable) ...
ANALOG_JUDGED_AT_S = 120.0
# ... and with fewer judgements than this the analogs are not used.
ANALOG_MIN_JUDGEMENTS = 5
_DAY_S = 86400.0


@dataclass(frozen=True, slots=True)
class AnalogReading:
    """`Analogs.safe_until` for one live stretch, read once (`Analogs.reading`): the least of
    the analogs' lengths and the calibrated factor. The simulator's learning process hands it to
    the engine's pool with the stretch's curve."""

    idle_since: float
    least_s: float
    factor: float

    def safe_until(self, idle_since: float, at: float) -> float | None:
        """As `Analogs.safe_until` answers, to the last bit: the least of (length - age) is the
        least length less the age (rounding keeps order)."""
        if idle_since != self.idle_since:
            raise ValueError(f"a reading of the stretch from {self.idle_since}, asked of one from {idle_since}")
        left = self.least_s - (at - idle_since)
        return at + left * self.factor if left > 0 else None


@dataclass
class Analogs:
    """A machine's own recent past as a forecast: how long its owner stays away this time, read
    from the stretches that began at the same time of day on the days before (`ANALOG_LAGS_D`),
    and how far that reading can be trusted, learnt from how it did on this machine's own past.

    `remaining(idle_since, at)`: at each lag k, the analog of the current stretch among the kept
    stretches that began near `idle_since - k days`, its length less the current stretch's age
    at `at`; the least of those over the lags that have one. The analog is the candidate under
    whose shift (its start less `idle_since - k days`) the most of the `ANALOG_ALIGN_STRETCHES`
    stretches before the current one have a stretch of that day that began and ended with them
    (within `ANALOG_ALIGN_TOLERANCE_S`), the nearest one on a tie; within `ANALOG_WINDOW_S`, or
    up to `ANALOG_SHIFT_MAX_S` where at least `ANALOG_FAR_LINED_UP` line up. Matching stretches
    by when they began and by what came before them, not the clock by the clock, follows an
    owner whose day runs earlier or later by a different amount each day. An owner
    who keeps the same days (a render farm's night, an office workstation, a gaming PC used in
    the evenings) is read closely; an irregular one is not, and the calibration says so:
    `calibrate(p)` replays the reading at `ANALOG_JUDGED_AT_S` into each kept stretch (using only
    stretches over by then) and keeps the ratio of what was left of the stretch to what the
    analogs said. `factor` is the (1 - p) quantile of those ratios, at most 1, so that
    `safe_until` = at + remaining x factor is a time the owner is still away with probability
    about p on this machine's record. None (no opinion) while there are fewer than
    `ANALOG_MIN_JUDGEMENTS` judgements, or when no lag has an analog or the analogs were over by
    now; the statistical forecast (`Forecast.curve`) then speaks alone.

    Kept: ended stretches of at least `ANALOG_SHORTEST_S`, over the last `ANALOG_KEEP_S`, at most
    `ANALOG_MAX_STRETCHES`; they may overlap (a machine's GPUs each have their own). Times are
    Unix seconds."""

    starts: list[float] = field(default_factory=list)  # sorted
    ends: list[float] = field(default_factory=list)  # the same stretches' ends
    observed_from: float | None = None  # the first kept stretch's start, or when history began
    factor: float | None = None  # from calibrate(); None: not trusted (yet)
    # calibrate()'s judgement of each kept stretch (start, end), made once: what it reads began a
    # day or more before it and is over by then. Kept up to date as stretches come and go, so
    # that a calibration judges only the stretches added since the last one (it walked every
    # kept stretch, up to a thousand, each time: a sixth of a simulation):
    _judged: dict[tuple[float, float], float | None] = field(default_factory=dict, repr=False, compare=False)
    _ratios: list[float] = field(default_factory=list, repr=False, compare=False)  # sorted, a copy each
    _unjudged: list[tuple[float, float]] = field(default_factory=list, repr=False, compare=False)  # since then
    # A live reading of a stretch's start made when every kept stretch was over by the time it
    # is judged at, is its judgement's reading: kept for calibrate() until a stretch it could
    # not have seen then (one over by that time, or begun before it) is added, or one is pruned.
    _replays: dict[float, list[float | None]] = field(default_factory=dict, repr=False, compare=False)
    # remaining()'s analog lengths by lag for a stretch's start, until a stretch is added (add()
    # empties it; pruning happens only there and in from_json, on a new object):
    # a live stretch is read again at each step of its age, the same analogs each time.
    _lengths: dict[float, list[float | None]] = field(default_factory=dict, repr=False, compare=False)
    _latest_end: float = field(default=-math.inf, repr=False, compare=False)  # no kept stretch ends later

    def add(self, start: float, end: float) -> None:
        """Keep an ended stretch (a short or malformed one is ignored)."""
        if not (math.isfinite(start) and math.isfinite(end)) or end - start < ANALOG_SHORTEST_S:
            return
        if self._replays:
            if self.observed_from is None or start < self.observed_from:
                self._replays.clear()  # the record now reaches further back than they read
            else:
                for since in [t for t in self._replays if start < t or end <= t + ANALOG_JUDGED_AT_S]:
                    del self._replays[since]
        if self.observed_from is None or start < self.observed_from:
            self.observed_from = start
        i = bisect_right(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)
        self._keep((start, end))
        self._latest_end = max(self._latest_end, end)
        self._lengths.clear()
        self._prune(end)

    def _keep(self, stretch: tuple[float, float]) -> None:
        ratio = self._judged.get(stretch)
        if ratio is not None:
            insort(self._ratios, ratio)  # a copy of a stretch judged before counts as it did
        elif stretch not in self._judged:
            self._unjudged.append(stretch)

    def _prune(self, latest_end: float) -> None:
        cut = bisect_right(self.starts, latest_end - ANALOG_KEEP_S)
        cut = max(cut, len(self.starts) - ANALOG_MAX_STRETCHES)
        if cut > 0:
            self._replays.clear()
            gone = list(zip(self.starts[:cut], self.ends[:cut], strict=True))
            del self.starts[:cut]
            del self.ends[:cut]
            for stretch, copies in Counter(gone).items():
                if stretch not in self._judged:
                    continue  # not judged yet
                ratio = self._judged[stretch]
                if ratio is not None:
                    for _ in range(copies):
                        del self._ratios[bisect_left(self._ratios, ratio)]
                if not self._copies(stretch):
                    del self._judged[stretch]
            self.observed_from = max(self.observed_from or -math.inf, self.starts[0] if self.starts else latest_end)

    def remaining(self, idle_since: float, at: float, *, known_by: float | None = None) -> float | None:
        """How much longer the owner, away since `idle_since`, stays away after `at`, read at
        each lag (class docstring): the least over the lags that have an analog; None when none
        has. `known_by` (default `at`): only stretches over by then are read, so a replay of the
        past reads what was known then."""
        if self.observed_from is None:
            return None
        return _least_left(self._reading(idle_since, at if known_by is None else known_by), at - idle_since)

    def _reading(self, idle_since: float, known_by: float) -> list[float | None]:
        """The analogs' lengths by lag for a stretch's start, read with what was over by
        `known_by` (`observed_from` is set)."""
        assert self.observed_from is not None
        # Every kept stretch is over by a live reading's `known_by`: its lengths are kept until
        # a stretch is added or pruned. A replay (calibrate) reads what was over by its time.
        live = known_by >= self._latest_end
        lengths = self._lengths.get(idle_since) if live else None
        if lengths is None:
            lengths = self._read(idle_since, known_by, self.observed_from)
            if live:
                if len(self._lengths) >= 64:
                    self._lengths.clear()
                self._lengths[idle_since] = lengths
                if self._latest_end <= idle_since + ANALOG_JUDGED_AT_S:
                    if len(self._replays) >= 64:
                        self._replays.clear()
                    self._replays[idle_since] = lengths
        return lengths

    def _read(self, idle_since: float, known_by: float, observed_from: float) -> list[float | None]:
        """The analog's length at each lag, None where there is none (or it was not over by
        `known_by`); the lags before the kept record are left out."""
        lengths: list[float | None] = []
        recent: list[int] | None = None  # read once, where a lag has more than one candidate
        starts, ends = self.starts, self.ends
        for lag in ANALOG_LAGS_D:
            target = idle_since - lag * _DAY_S
            if target < observed_from - ANALOG_WINDOW_S:
                break
            lo = bisect_left(starts, target - ANALOG_SHIFT_MAX_S)
            hi = bisect_right(starts, target + ANALOG_SHIFT_MAX_S)
            if hi - lo == 1 and abs(starts[lo] - target) <= ANALOG_WINDOW_S:
                best: int | None = lo  # the one candidate, near: nothing to line up against
            elif hi > lo:
                if recent is None:
                    recent = self._before(idle_since, known_by)
                best = self._analog(target, lo, hi, known_by, recent, lag * _DAY_S)
            else:
                best = None
            lengths.append(None if best is None or ends[best] > known_by else ends[best] - starts[best])
        return lengths

    def _before(self, idle_since: float, known_by: float) -> list[int]:
        """The last ANALOG_ALIGN_STRETCHES kept stretches that began before `idle_since` and were
        over by then (and by `known_by`), latest first."""
        found: list[int] = []
        over_by = min(idle_since, known_by)
        i = bisect_left(self.starts, idle_since) - 1
        stop = max(i - 4 * ANALOG_ALIGN_STRETCHES, -1)
        ends = self.ends
        while i > stop:
            if ends[i] <= over_by:
                found.append(i)
                if len(found) == ANALOG_ALIGN_STRETCHES:
                    break
            i -= 1
        return found

    def _analog(self, target: float, lo: int, hi: int, known_by: float, recent: list[int], lag_s: float) -> int | None:
        """The analog (class docstring) among the kept stretches lo..hi-1, which began within
        ANALOG_SHIFT_MAX_S of `target`; None when none qualifies."""
        starts = self.starts
        best, most = None, -1
        # Nearest first (the earlier of two as near): the first candidate under which every
        # recent stretch lines up wins.
        left, right = bisect_left(starts, target, lo, hi) - 1, bisect_left(starts, target, lo, hi)
        while left >= lo or right < hi:
            if right >= hi or (left >= lo and target - starts[left] <= starts[right] - target):
                i, left = left, left - 1
            else:
                i, right = right, right + 1
            near = abs(starts[i] - target) <= ANALOG_WINDOW_S
            if not recent:
                return i if near else None
            lined_up = self._lined_up(recent, starts[i] - target - lag_s, known_by)
            if lined_up > most and (near or lined_up >= ANALOG_FAR_LINED_UP):
                best, most = i, lined_up
                if lined_up == len(recent):
                    break
        return best

    def _lined_up(self, recent: list[int], offset: float, known_by: float) -> int:
        """How many of the `recent` stretches, moved by `offset`, meet a kept stretch over by
        `known_by` that began and ended with them within ANALOG_ALIGN_TOLERANCE_S."""
        starts, ends, tolerance = self.starts, self.ends, ANALOG_ALIGN_TOLERANCE_S
        count = 0
        for r in recent:
            start, end = starts[r] + offset, ends[r] + offset
            j = bisect_left(starts, start - tolerance)
            while j < len(starts) and starts[j] <= start + tolerance:
                if abs(ends[j] - end) <= tolerance and ends[j] <= known_by:
                    count += 1
                    break
                j += 1
        return count

    def _replayed(self, start: float) -> float | None:
        """remaining(start, start + ANALOG_JUDGED_AT_S), from the live reading where one is kept."""
        lengths = self._replays.pop(start, None)
        judged = start + ANALOG_JUDGED_AT_S
        if lengths is None:
            return self.remaining(start, judged)
        return _least_left(lengths, judged - start)  # the age as remaining() has it, to the last bit

    def _copies(self, stretch: tuple[float, float]) -> int:
        """How many times the stretch is kept (a machine's GPUs may each have had it)."""
        start, end = stretch
        starts, ends = self.starts, self.ends
        i, copies = bisect_left(starts, start), 0
        while i < len(starts) and starts[i] == start:
            copies += ends[i] == end
            i += 1
        return copies

    def calibrate(self, p: float) -> float | None:
        """Learn `factor` from the kept stretches (class docstring); returns it."""
        for stretch in self._unjudged:
            if stretch in self._judged:
                continue  # a copy judged just before
            copies = self._copies(stretch)
            if not copies:
                continue  # pruned since
            start, end = stretch
            judged = start + ANALOG_JUDGED_AT_S
            said = self._replayed(start) if end > judged else None
            ratio = (end - judged) / said if said is not None and said > 0 else None
            self._judged[stretch] = ratio
            if ratio is not None:
                for _ in range(copies):
                    insort(self._ratios, ratio)
        self._unjudged.clear()
        ratios = self._ratios
        if len(ratios) < ANALOG_MIN_JUDGEMENTS:
            self.factor = None
        else:
            self.factor = min(ratios[int((1.0 - p) * (len(ratios) - 1))], 1.0)
        return self.factor

    def safe_until(self, idle_since: float, at: float) -> float | None:
        """The time until which the owner, away since `idle_since`, stays away with the
        calibrated probability, read at `at`; None when the analogs have no opinion (class
        docstring)."""
        if self.factor is None or self.factor <= 0:
            return None
        left = self.remaining(idle_since, at)
        if left is None or left <= 0:
            return None
        return at + left * self.factor

    def reading(self, idle_since: float, at: float) -> AnalogReading | None:
        """What `safe_until(idle_since, t)` answers at every `t` from `at` on, read now, kept
        apart from the analogs; None where it answers None throughout. Only for a live stretch:
        every kept stretch over by `at` (each later reading of it is then the same), else
        ValueError."""
        if at < self._latest_end:
            raise ValueError("a reading ahead is only for a stretch every kept stretch was over by")
        if self.factor is None or self.factor <= 0 or self.observed_from is None:
            return None
        lengths = [length for length in self._reading(idle_since, at) if length is not None]
        if not lengths:
            return None
        return AnalogReading(idle_since, min(lengths), self.factor)

    def to_json(self) -> dict[str, Any]:
        return {
            "observed_from": self.observed_from,
            "factor": self.factor,
            "stretches": [[s, e - s] for s, e in zip(self.starts, self.ends, strict=True)],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Analogs:
        """The inverse of to_json; raises ValueError (or TypeError) on malformed data."""
        analogs = cls()
        if not data:
            return analogs
        stretches = sorted((_finite(start), _finite(length)) for start, length in data.get("stretches") or ())
        if any(length < 0 for _, length in stretches):
            raise ValueError("a stretch of negative length")
        # Built whole and pruned once, not added one by one (each add would prune).
        analogs.starts = [start for start, _ in stretches]
        analogs.ends = [start + length for start, length in stretches]
        for stretch in zip(analogs.starts, analogs.ends, strict=True):
            analogs._keep(stretch)
        if stretches:
            analogs.observed_from = analogs.starts[0]
            analogs._latest_end = max(analogs.ends)
            analogs._prune(max(analogs.ends))
        observed = data.get("observed_from")
        if observed is not None:
            analogs.observed_from = min(_finite(observed), analogs.observed_from or math.inf)
        factor = data.get("factor")
        analogs.factor = None if factor is None else _finite(factor)
        if analogs.factor is not None and not 0 <= analogs.factor <= 1:
            raise ValueError(f"analog factor out of range: {analogs.factor}")
        return analogs


def _least_left(lengths: list[float | None], age: float) -> float | None:
    """The least of the analogs' lengths less the current stretch's age; None when none has one."""
    found: float | None = None
    for length in lengths:
        if length is not None:
            left = length - age
            found = left if found is None else min(found, left)
    return found


def _finite(value: object) -> float:
    """A stored number: a finite int or float (not a string, not a bool), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"not a finite number: {value!r}")
    return float(value)


@dataclass
class Forecast:
    """The forecast of one machine: its own counts blended with the fleet prior, and its analogs
    (the same time on the days before; None: none kept)."""

    machine: StretchCounts
    fleet: StretchCounts
    analogs: Analogs | None = None
    _cache: dict[int, Survival] = field(default_factory=dict, repr=False)
    _all: tuple[list[float], list[float]] | None = field(default=None, repr=False)
    _days: dict[int, tuple[list[float], list[float]]] = field(default_factory=dict, repr=False)

    def curve(self, began_hour: int) -> Survival:
        """The survival function of stretches that begin in hour-of-week `began_hour`: the
        machine's counts of that hour, blended with those of the same hour on every day of the
        week, blended with its all-hours counts and the fleet's (module docstring). Levels
        without data of the machine's own are skipped: the blend below them has the same
        shape (a survival curve does not change when every count is scaled)."""
        found = self._cache.get(began_hour)
        if found is None:
            own = self.machine
            hour_of_day = began_hour % 24
            same_hour = [h for h in range(hour_of_day, HOURS_OF_WEEK, 24) if h in own.ended or h in own.censored]
            if not same_hour:
                found = self._cache.get(_ALL_HOURS)
                if found is None:
                    found = self._cache[_ALL_HOURS] = Survival.from_profile(*self._mine_all())
            elif began_hour not in same_hour:
                key = _ALL_HOURS + 1 + hour_of_day
                found = self._cache.get(key)
                if found is None:
                    found = self._cache[key] = Survival.from_profile(*self._day(hour_of_day, same_hour))
            else:
                blend = _scaled(self._day(hour_of_day, same_hour), HOUR_PRIOR_WEIGHT)
                _add_hour(blend, own, began_hour)
                found = Survival.from_profile(*blend)
            self._cache[began_hour] = found
        return found

    def _mine_all(self) -> tuple[list[float], list[float]]:
        if self._all is None:
            self._all = _add(self.machine._view(None), self.fleet.scaled(FLEET_PRIOR_WEIGHT))
        return self._all

    def _day(self, hour_of_day: int, hours: list[int]) -> tuple[list[float], list[float]]:
        """The machine's counts of stretches begun at this hour of any day, blended with the
        all-hours level."""
        found = self._days.get(hour_of_day)
        if found is None:
            found = _scaled(self._mine_all(), HOUR_PRIOR_WEIGHT)
            for h in hours:
                _add_hour(found, self.machine, h)
            self._days[hour_of_day] = found
        return found

    def survival(self, *, idle_since: float, now: float, more_s: float) -> float:
        """P(a machine idle since `idle_since` (Unix s) stays idle until `now + more_s`)."""
        age = max(now - idle_since, 0.0)
        return self.curve(hour_of_week(idle_since)).conditional(age, more_s)

    def median_more(self, *, idle_since: float, now: float) -> float:
        """The median of how much longer the machine stays idle, seconds."""
        age = max(now - idle_since, 0.0)
        return self.curve(hour_of_week(idle_since)).quantile_more(age, 0.5)


def _sawtooth_integral(x: float, interval: float) -> float:
    """The integral of (t mod interval) dt from 0 to x."""
    whole, rest = divmod(x, interval)
    return whole * interval * interval / 2 + rest * rest / 2


def expected_lost_s(
    survive: Callable[[float], float],
    *,
    duration_s: float,
    checkpoint_interval_s: float | None,
    steps: int = 48,
) -> float:
    """Expected seconds of work a job of `duration_s` loses on a machine where `survive(x)` is
    the probability that the owner is still away x seconds from now: if the owner comes back at
    x < duration, the work since the last checkpoint (x mod interval; all of x without
    checkpoints) is lost. Summed over `steps` log-spaced segments of [0, duration], the owner's
    return taken as uniform inside each."""
    if duration_s <= 0:
        return 0.0
    interval = checkpoint_interval_s if checkpoint_interval_s and checkpoint_interval_s > 0 else None
    start = min(30.0, duration_s / 2)
    ratio = (duration_s / start) ** (1 / max(steps - 1, 1))
    points = [0.0] + [start * ratio**k for k in range(steps - 1)] + [duration_s]
    lost = 0.0
    previous_s = 1.0
    for a, b in pairwise(points):
        if b <= a:
            continue
        s = survive(b)
        if interval:
            mean_lost = (_sawtooth_integral(b, interval) - _sawtooth_integral(a, interval)) / (b - a)
        else:
            mean_lost = (a + b) / 2
        lost += max(previous_s - s, 0.0) * mean_lost
        previous_s = s
    return lost


__all__ = [
    "BIN_EDGES_S",
    "SAFE_P",
    "AnalogReading",
    "Analogs",
    "Forecast",
    "StretchCounts",
    "Survival",
    "bin_of",
    "expected_lost_s",
    "hour_of_week",
]
