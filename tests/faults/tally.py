"""The fault suite's count: what each test did and what it found, summed over the run and printed at its end.

A test records what it actually did — a fault it injected, a case a fuzzer
ran, an upload it verified byte for byte — as it does it, never a number
written in advance. The totals (``Tally.summary``) are what docs/reliability.md
publishes; ``DIRECTDRIVEX_FAULTS_REPORT=<path>`` also writes them as JSON.

"Lost" bytes are bytes of an upload that ended complete while its stored bytes
differ from the client's file (or that could not be made to complete): the
tests assert there are none, and the tally says how many bytes that covered.
"""

import json
import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Tally:
    faults: Counter = field(default_factory=Counter)  # kind -> injected
    cases: Counter = field(default_factory=Counter)  # fuzzer / attack -> cases run
    uploads_completed: int = 0
    bytes_verified: int = 0
    bytes_lost: int = 0
    slots_leaked: int = 0
    internal_errors: int = 0
    crash_leftovers_repaired: int = 0  # fsck findings a kill -9 left (unread bytes), mended by --repair
    explained_errors: int = 0  # ERROR lines a fault itself makes a host write, named by the test (never bugs)
    checks: Counter = field(default_factory=Counter)  # invariant -> times checked
    tests: Counter = field(default_factory=Counter)  # outcome -> tests
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fault(self, kind: str, count: int = 1) -> None:
        with self._lock:
            self.faults[kind] += count

    def case(self, kind: str, count: int = 1) -> None:
        with self._lock:
            self.cases[kind] += count

    def check(self, invariant: str, count: int = 1) -> None:
        with self._lock:
            self.checks[invariant] += count

    def upload(self, size: int, *, intact: bool) -> None:
        """An upload the test drove to its end: complete with every byte equal (intact), or not."""
        with self._lock:
            if intact:
                self.uploads_completed += 1
                self.bytes_verified += size
            else:
                self.bytes_lost += size

    def repaired(self, findings: int) -> None:
        with self._lock:
            self.crash_leftovers_repaired += findings

    def leaked(self, slots: int) -> None:
        with self._lock:
            self.slots_leaked += slots

    def errors(self, count: int, *, explained: int = 0) -> None:
        with self._lock:
            self.internal_errors += count
            self.explained_errors += explained

    def empty(self) -> bool:
        return not (self.faults or self.cases or self.uploads_completed or self.bytes_lost)

    def summary(self) -> dict:
        return {
            "tests": dict(sorted(self.tests.items())),
            "faults_injected": dict(sorted(self.faults.items())),
            "faults_total": sum(self.faults.values()),
            "fuzz_and_attack_cases": dict(sorted(self.cases.items())),
            "cases_total": sum(self.cases.values()),
            "uploads_completed": self.uploads_completed,
            "bytes_verified": self.bytes_verified,
            "bytes_lost": self.bytes_lost,
            "slots_leaked": self.slots_leaked,
            "internal_errors": self.internal_errors,
            "error_lines_explained_by_the_fault": self.explained_errors,
            "crash_leftovers_repaired_by_fsck": self.crash_leftovers_repaired,
            "invariant_checks": dict(sorted(self.checks.items())),
        }

    def lines(self) -> list[str]:
        """The summary as the plain text the run prints (and docs/reliability.md copies)."""
        report = self.summary()
        out = [f"tests: {', '.join(f'{n} {outcome}' for outcome, n in report['tests'].items()) or 'none'}"]
        out.append(f"faults injected: {report['faults_total']}")
        out += [f"  {kind}: {n}" for kind, n in report["faults_injected"].items()]
        out.append(f"fuzz and attack cases: {report['cases_total']}")
        out += [f"  {kind}: {n}" for kind, n in report["fuzz_and_attack_cases"].items()]
        out.append(
            f"uploads completed and verified: {report['uploads_completed']} "
            f"({report['bytes_verified'] / 2**30:.2f} GiB compared byte for byte by sha256)"
        )
        out.append(f"bytes lost: {report['bytes_lost']}")
        out.append(f"slots leaked: {report['slots_leaked']}")
        out.append(f"internal errors: {report['internal_errors']}")
        out.append(f"error lines explained by the fault (a close frozen past its budget): {self.explained_errors}")
        out.append(
            f"crash leftovers (unrecorded tails / parts of killed writers) mended by fsck --repair: "
            f"{self.crash_leftovers_repaired}"
        )
        out.append("invariant checks: " + ", ".join(f"{k} {n}" for k, n in report["invariant_checks"].items()))
        return out

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2, sort_keys=True)


TALLY = Tally()
