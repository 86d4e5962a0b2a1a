"""Compare Parsl's test suite on its thread config and on falconet's, from two JUnit files.

    python tests/parsl/compare.py threads.xml falconet.xml --exclusions tests/parsl/exclusions.txt \
        [--regressions ids.txt] [--rerun falconet-rerun.xml]

Every test that passes on Parsl's ThreadPoolExecutor must pass on falconet, unless
exclusions.txt lists it with its reason (those are deselected from the falconet run).
Prints the counts of both runs and each difference; exits 1 when falconet fails a test
the threads pass, when the two runs did not select the same tests, or when an excluded
test ran all the same.

Parsl's suite has timing tests that run in the test process alone (a 5 ms timer in
test_python_apps/test_timeout.py) and fail now and then on a loaded machine, whichever
executor is configured.  So a regression is written to --regressions, run again on
falconet, and the second run (--rerun) decides; the script says which tests were flaky.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import Counter

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


def outcomes(path: str) -> dict[str, str]:
    """{test id: passed/failed/skipped} from a pytest JUnit XML file; ids are relative to parsl/tests."""
    found = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "")
        module = module.split("parsl.tests.", 1)[-1].replace(".", "/")
        test_id = f"{module}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            found[test_id] = FAILED
        elif case.find("skipped") is not None:
            found[test_id] = SKIPPED
        else:
            found[test_id] = PASSED
    return found


def read_exclusions(path: str) -> dict[str, str]:
    """{test id: reason} from lines `TEST_ID  # reason`; blank and comment lines skipped."""
    excluded = {}
    with open(path) as fh:
        for line in fh:
            test_id, _, reason = line.partition("#")
            if test_id.strip():
                excluded[test_id.strip()] = reason.strip()
    return excluded


def compare(threads: dict[str, str], falconet: dict[str, str], excluded: dict[str, str]) -> list[str]:
    """The problems: tests passing on threads and not on falconet, and tests only one run has."""
    problems = []
    for test_id, outcome in sorted(threads.items()):
        if test_id in excluded:
            continue
        if test_id not in falconet:
            problems.append(f"{test_id}: ran on threads ({outcome}), not on falconet")
        elif outcome == PASSED and falconet[test_id] != PASSED:
            problems.append(f"{test_id}: passed on threads, {falconet[test_id]} on falconet")
    problems += [f"{t}: ran on falconet, not on threads" for t in sorted(set(falconet) - set(threads))]
    problems += [f"{t}: excluded, yet it ran on falconet (is its id right?)" for t in sorted(excluded)
                 if t in falconet]
    return problems


def summary(name: str, results: dict[str, str]) -> str:
    counts = Counter(results.values())
    return f"{name}: {counts[PASSED]} passed, {counts[FAILED]} failed, {counts[SKIPPED]} skipped"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("threads")
    parser.add_argument("falconet")
    parser.add_argument("--exclusions", required=True)
    parser.add_argument("--regressions", help="write the ids that passed on threads and not on falconet here")
    parser.add_argument("--rerun", help="JUnit file of those tests run again on falconet: its outcomes win")
    args = parser.parse_args(argv)
    threads, falconet = outcomes(args.threads), outcomes(args.falconet)
    if args.rerun:
        again = outcomes(args.rerun)
        for test_id, outcome in sorted(again.items()):
            print(f"run again on falconet: {test_id}: {falconet.get(test_id)} then {outcome}"
                  + (" (flaky)" if outcome == PASSED else ""))
        falconet.update(again)
    excluded = read_exclusions(args.exclusions)
    print(summary("Parsl's thread config", threads))
    print(summary("falconet's config", falconet))
    for test_id, reason in excluded.items():
        print(f"excluded on falconet: {test_id} ({threads.get(test_id, 'not run')} on threads): {reason}")
    for test_id in sorted(t for t, o in falconet.items() if o == FAILED and threads.get(t) == FAILED):
        print(f"fails on both configs (not falconet's): {test_id}")
    problems = compare(threads, falconet, excluded)
    if args.regressions:
        with open(args.regressions, "w") as fh:
            fh.writelines(f"{t}\n" for t, o in threads.items()
                          if o == PASSED and falconet.get(t) not in (None, PASSED) and t not in excluded)
    for problem in problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
