"""DeepSpeed's CPUAdam on dense_16m, as ../shared/peers/bench_anchors.py times it, with a chosen
thread count and a chosen subset of its configurations; prints one JSON object a line.

  python deepspeed_dense.py [--threads N] [--configs NAME,...]

Run it with the interpreter of the anchors' environment (made by setup_anchors.sh).
bench_anchors.py is imported, not copied: its check, its timing rule and its JSON lines are the
same; only its thread count (THREADS and OMP_NUM_THREADS, 2 there) is replaced.

--threads N    threads for torch and OpenMP (default 2, as in bench_anchors.py)
--configs      comma-separated, of: f32, bf16 (bf16 params+grads+states), bf16-f32states,
               f16 (f16 params+grads+states), f16-f32states (default: all five).
               bench_anchors.py has no switch for its configurations, so the others still
               run their check and their timed steps; only their lines are left out.

PEERS_DIR (default: ../shared/peers beside the repository) is where bench_anchors.py lies.
"""
import argparse
import os
import sys

import deepspeed_configs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(deepspeed_configs.NAMES))
    args = ap.parse_args()
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    wanted, err = deepspeed_configs.parse_names(args.configs)
    if err:
        ap.error(f"--configs: {err}")
    tags = {deepspeed_configs.TAG[c] for c in wanted}

    # Before the import: bench_anchors.py only sets OMP_NUM_THREADS when it is unset.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    here = os.path.dirname(os.path.abspath(__file__))
    peers = os.environ.get("PEERS_DIR", os.path.join(here, "..", "..", "shared", "peers"))
    sys.path.insert(0, os.path.abspath(peers))
    import bench_anchors

    bench_anchors.THREADS = args.threads
    emit = bench_anchors.emit

    def emit_wanted(name, impl, med, best):
        if deepspeed_configs.tag_of(impl) in tags:
            emit(name, impl + f" threads={args.threads}", med, best)

    bench_anchors.emit = emit_wanted
    bench_anchors.bench_deepspeed("dense_16m", bench_anchors.WORKLOADS["dense_16m"], 15)


if __name__ == "__main__":
    main()
