"""Summarize a sitting written by benches/sitting.sh: per workload and implementation, the median
step time of every round, and lazyadam's ratios against each peer taken within the same round.

  python3 benches/summarize_sitting.py benches/results/SITTING.jsonl

Only the standard library; prints Markdown tables.
"""
import collections
import json
import sys


def main():
    lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    head = next((d for d in lines if d.get("kind") == "sitting"), {})
    print(f"sitting: {head}")
    times = collections.defaultdict(dict)  # (workload, impl) -> round -> median_ms
    for d in lines:
        if "workload" in d and "median_ms" in d and "kind" not in d:
            times[(d["workload"], d["impl"])][d["round"]] = d["median_ms"]
    rounds = sorted({r for v in times.values() for r in v})
    for workload in sorted({w for w, _ in times}):
        print(f"\n### {workload}\n")
        print("| implementation | " + " | ".join(f"round {r}" for r in rounds) + " |")
        print("| --- |" + " --- |" * len(rounds))
        for (w, impl), by_round in sorted(times.items()):
            if w == workload:
                print(f"| {impl} | " + " | ".join(f"{by_round.get(r, float('nan')):.4g}" for r in rounds) + " |")
        ours = times.get((workload, "lazyadam-f32"), {})
        for (w, impl), by_round in sorted(times.items()):
            if w != workload or impl.startswith("lazyadam"):
                continue
            ratios = [by_round[r] / ours[r] for r in rounds if r in ours and r in by_round]
            if ratios:
                print(f"- lazyadam-f32 vs {impl}: {min(ratios):.2f}x-{max(ratios):.2f}x faster")
    for d in lines:
        if d.get("kind") in ("serial_fraction", "stream_triad"):
            print(json.dumps(d, sort_keys=True))


if __name__ == "__main__":
    main()
