"""Summarize a sitting written by benches/sitting.sh (or benches/dense_vs_deepspeed.sh): per
workload and implementation, the median step time of every round, and each peer's time over
lazyadam's taken within the same round (above 1: lazyadam is faster), against the configuration
with the same storage (DeepSpeed's 16-bit variants) or lazyadam-f32: its range over the rounds,
its median, and the number of rounds in which lazyadam was behind.

  python3 benches/summarize_sitting.py benches/results/SITTING.jsonl

Only the standard library; prints Markdown tables.
"""
import collections
import json
import statistics
import sys


from deepspeed_configs import lazyadam_counterpart


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
        for (w, impl), by_round in sorted(times.items()):
            if w != workload or impl.startswith("lazyadam"):
                continue
            config = lazyadam_counterpart(impl)
            ours = times.get((workload, config), {})
            ratios = [by_round[r] / ours[r] for r in rounds if r in ours and r in by_round]
            if ratios:
                behind = sum(x < 1 for x in ratios)
                print(f"- {impl} / {config}, round by round: {min(ratios):.2f}x-{max(ratios):.2f}x,"
                      f" median {statistics.median(ratios):.2f}x, lazyadam behind in {behind} of"
                      f" {len(ratios)}")
    for d in lines:
        if d.get("kind") in ("serial_fraction", "stream_triad"):
            print(json.dumps(d, sort_keys=True))


if __name__ == "__main__":
    main()
