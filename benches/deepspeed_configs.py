"""The one table of DeepSpeed's dense configurations and their lazyadam counterparts.

Used by deepspeed_dense.py (which configurations to keep), summarize_sitting.py (which lazyadam
line a DeepSpeed line is compared with) and dense_vs_deepspeed.sh (the peer-workloads
configurations that match DS_CONFIGS). Standard library only: the summarizer runs without the
peers' environments.

  python3 deepspeed_configs.py lazyadam NAME,...   the peer-workloads configurations, one a line
"""
import sys

# (short name, the tag ../shared/peers/bench_anchors.py gives the configuration,
#  the peer-workloads configuration with the same storage)
CONFIGS = [
    ("f32", "f32", "lazyadam-f32"),
    ("bf16-f32states", "bf16 params+grads, f32 states", "lazyadam-bf16-f32moments"),
    ("bf16", "bf16 params+grads+states", "lazyadam-bf16"),
    ("f16-f32states", "f16 params+grads, f32 states", "lazyadam-f16-f32moments"),
    ("f16", "f16 params+grads+states", "lazyadam-f16"),
]

NAMES = [name for name, _, _ in CONFIGS]
TAG = {name: tag for name, tag, _ in CONFIGS}
LAZYADAM = {name: ours for name, _, ours in CONFIGS}

_MARK = "DeepSpeedCPUAdam("


def tag_of(impl):
    """The configuration tag of a DeepSpeed impl string, or None for any other impl.

    The string is "deepspeed V DeepSpeedCPUAdam(OPTIONS) TAG [SIMD]", with " threads=N" after
    it when deepspeed_dense.py wrote it. Parsed, not substring-matched: "f16 params+grads+states"
    is a substring of "bf16 params+grads+states".
    """
    if _MARK not in impl:
        return None
    rest = impl.split(_MARK, 1)[1]
    if ") " not in rest:
        return None
    return rest.split(") ", 1)[1].rsplit(" [", 1)[0]


def lazyadam_counterpart(impl):
    """The lazyadam configuration a peer's line is compared with: the same storage for a
    DeepSpeed configuration, lazyadam-f32 for every other peer (all of them f32)."""
    tag = tag_of(impl)
    return next((ours for _, t, ours in CONFIGS if t == tag), "lazyadam-f32")


def parse_names(text):
    """Comma-separated short names, checked. Returns (names, error message or None)."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in TAG]
    if unknown or not names:
        return names, f"unknown {unknown or 'empty'}; known: {', '.join(NAMES)}"
    return names, None


def main(argv):
    if len(argv) != 3 or argv[1] != "lazyadam":
        sys.exit("usage: python3 deepspeed_configs.py lazyadam NAME,...")
    names, err = parse_names(argv[2])
    if err:
        sys.exit(f"deepspeed_configs.py: {err}")
    for name in names:
        print(LAZYADAM[name])


if __name__ == "__main__":
    main(sys.argv)
