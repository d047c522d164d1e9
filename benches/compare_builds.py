#!/usr/bin/env python3
"""Times two builds of the criterion kernel bench in one sitting, interleaved.

    cargo bench -p lazyadam-benches --bench kernels --no-run   # on each commit; copy the
    # printed executable aside, e.g. to /tmp/kernels-before and /tmp/kernels-after
    python3 benches/compare_builds.py /tmp/kernels-before /tmp/kernels-after \
        'adam/all-(f32|f16|bf16)/portable/4096$' --rounds 3 --sitting NAME --out OUT.jsonl

Each round runs `before`, then `after` (the order alternates from round to round so neither
build always runs first), each with criterion's `--bench FILTER`. Every bench's median goes
to one JSON line (`sitting`, `round`, `build`, `bench`, `ns`), and the per-bench medians of
both builds and their ratio (after / before) are printed at the end.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys

UNIT = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}
# A bench's name is on a line of its own, or (names shorter than criterion's column) first on
# the line of its time.
NAME = re.compile(r"^(\S+/\S+)(?:\s*$|\s+time:)")
TIME = re.compile(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]")


def run(binary, pattern, warm_up, measure):
    """The bench medians (ns) of one run of `binary`, by bench name."""
    out = subprocess.run(
        [binary, "--bench", pattern, "--warm-up-time", str(warm_up),
         "--measurement-time", str(measure)],
        check=True, capture_output=True, text=True).stdout
    medians, name = {}, None
    for line in out.splitlines():
        m = NAME.match(line)
        if m:
            name = m.group(1)
        m = TIME.search(line)
        if m and name:
            medians[name] = float(m.group(1)) * UNIT[m.group(2)]
            name = None
    if not medians:
        sys.exit(f"{binary}: no bench matched {pattern!r}")
    return medians


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("pattern")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sitting", default="compare-builds")
    ap.add_argument("--out", required=True)
    ap.add_argument("--warm-up", type=float, default=0.5)
    ap.add_argument("--measure", type=float, default=2.0)
    a = ap.parse_args()
    times = {}
    with open(a.out, "a") as f:
        for r in range(1, a.rounds + 1):
            order = [("before", a.before), ("after", a.after)]
            for build, binary in order if r % 2 else order[::-1]:
                for bench, ns in run(binary, a.pattern, a.warm_up, a.measure).items():
                    f.write(json.dumps({"sitting": a.sitting, "round": r, "build": build,
                                        "bench": bench, "ns": round(ns, 1)}) + "\n")
                    times.setdefault(bench, {}).setdefault(build, []).append(ns)
    print(f"{'bench':40} {'before ns':>24} {'after ns':>24} {'after/before':>14}")
    for bench, t in times.items():
        b, af = t.get("before", []), t.get("after", [])
        ratio = statistics.median(af) / statistics.median(b) if b and af else float("nan")
        fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
        print(f"{bench:40} {fmt(b):>24} {fmt(af):>24} {ratio:14.2f}")


if __name__ == "__main__":
    main()
