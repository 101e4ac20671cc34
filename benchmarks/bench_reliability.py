"""Reliability figures: the corpus of tests/compiler/reliability.py run through the CLI, counted.

Prints bad inputs tried / handled (exit 2, one line with a remedy, no traceback, nothing
written or lost), tamper cases tried / detected, and files lost (must be 0): every file
of the user's directory before a case that is missing or changed after it.

    python benchmarks/bench_reliability.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "compiler"))

from reliability import bad_input_cases, check_bad_input, check_tamper, make_workdir, tamper_cases  # noqa: E402


def main() -> int:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = make_workdir(root / "home")
        bad, tamper = bad_input_cases(), tamper_cases()
        handled, lost, failures = 0, 0, []
        inputs = {k: files[k].read_bytes() for k in ("model", "calib", "eval")}
        for case in bad:
            outcome = check_bad_input(case, files)
            lost += outcome.lost
            handled += outcome.handled
            if not outcome.handled:
                failures.append((case.id, outcome.reasons))
        detected = 0
        for t in tamper:
            outcome = check_tamper(t, files, root)
            detected += outcome.handled
            if not outcome.handled:
                failures.append((t.id, outcome.reasons))
        lost += sum(files[k].read_bytes() != v for k, v in inputs.items())
    print(f"bad inputs:   {len(bad)} tried, {handled} handled ({100 * handled / len(bad):.1f} %)")
    print(f"tamper cases: {len(tamper)} tried, {detected} detected ({100 * detected / len(tamper):.1f} %)")
    print(f"files lost:   {lost}")
    print(f"time:         {time.perf_counter() - t0:.1f} s")
    for cid, reasons in failures:
        print(f"  NOT HANDLED {cid}: {'; '.join(reasons)}")
    return 0 if not failures and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
