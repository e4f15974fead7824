"""A running job's output, shipped to the marketplace in chunks (its renter follows it live).

Each poll, LeaseTracker.ship_output reads what the workload wrote since the last read from the
file it writes (the runner's read_output: a plain read of a file, so the job never waits for
the agent) and queues it in the spool as a chunk with the lease's next `seq`. The spool records
the chunk and the lease's read position in one transaction (spool.LogCursor), so after a crash
or an outage every byte is shipped once, in order. What this module decides:

- where a chunk may end (`cut_output`): never inside a UTF-8 character, and, while the job runs,
  never inside what could be the start of a secret: an end of the output that is the beginning
  of a secret (in any letter case) waits for the next read. So a secret split across two reads
  is still seen whole, and scrubbed exactly as the log tail is (leases.scrub_secrets), while
  any other output is shipped at once;
- how much: at most READ_BYTES per read and READS_PER_POLL reads per lease per poll (so a
  chatty job costs the agent a bounded amount of work), a short chunk at most every
  MIN_INTERVAL_S (a trickle of output is gathered, not shipped a line per poll), CHUNKS_PER_S
  for the machine, and
  `max_bytes` per lease in all; past that one last chunk says so (`truncated`) and nothing
  more is read.
"""

from __future__ import annotations

import re

READ_BYTES = 16 * 1024  # a chunk's raw output: its text stays under the API's 64 KiB per chunk
READS_PER_POLL = 4
# A job that writes a little at a time ships one chunk per this many seconds (the renter's
# follower asks every 2 s); a full read (READ_BYTES) ships at once.
MIN_INTERVAL_S = 2.0
# The whole machine queues at most this many chunks a second (a burst of CHUNKS_BURST), well
# within the marketplace's THROTTLE_MACHINE_LOGS (600/min); a lease's last output, read when it
# ends, is not held to it.
CHUNKS_PER_S = 4.0
CHUNKS_BURST = 8
DEFAULT_MAX_BYTES = 10 * 1024 * 1024


# What a lease's last output, read when it ended, may add at most (64 reads).
FINAL_BYTES = 1024 * 1024


def truncation_notice(max_bytes: int, *, ending: bool = False) -> str:
    """The end of a lease's last chunk: it passed `max_bytes`, or (`ending`) it wrote more than
    FINAL_BYTES in its last moments."""
    if ending:
        return (
            f"\n[gpgpu-agent: the job wrote more than {FINAL_BYTES} bytes as it ended; the rest is not "
            "shipped (the last lines come with the job's end)]\n"
        )
    return (
        f"\n[gpgpu-agent: this lease's output passed {max_bytes} bytes; the rest is not shipped "
        "(the last lines come with the job's end)]\n"
    )


def _unfinished_utf8(data: bytes) -> int:
    """How many bytes at the end of `data` start a UTF-8 character that is not complete yet."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the lead of the last character
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if need > back else 0
    return 0


def cut_output(raw: bytes, *, secrets: tuple[str, ...], final: bool) -> tuple[str, bytes]:
    """Split `raw` (held-back bytes then new output) into (text to ship now, bytes to hold back).

    The text is raw decoded as UTF-8 (undecodable bytes replaced, NULs removed), still to be
    scrubbed (leases.scrub_secrets): no secret in `raw` is split by the cut. Unless `final` (the
    job ended, or nothing more will be read), an unfinished character and the longest end of
    the text that is the beginning of a secret are held back (never more than the longest
    secret's length - 1 characters), and a cut that would split a whole secret found in `raw`
    moves to its end. Whatever is held back comes first in the next call's `raw`."""
    raw, held = raw.replace(b"\x00", b""), b""
    if not final:
        keep = _unfinished_utf8(raw)
        raw, held = raw[: len(raw) - keep], raw[len(raw) - keep :]
    text = raw.decode("utf-8", "surrogateescape")
    if not final and secrets:
        lowered = [s.lower() for s in secrets]
        cut = next(
            (
                at
                for at in range(max(0, len(text) - (max(map(len, secrets)) - 1)), len(text))
                if any(s.startswith(text[at:].lower()) for s in lowered)
            ),
            len(text),
        )
        spans = [m.span() for s in secrets for m in re.finditer(re.escape(s), text, re.IGNORECASE)]
        moved = True
        while moved:
            moved = False
            for start, end in spans:
                if start < cut < end:
                    cut, moved = end, True
        held = text[cut:].encode("utf-8", "surrogateescape") + held
        text = text[:cut]
    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return shown, held
