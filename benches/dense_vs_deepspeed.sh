#!/usr/bin/env bash
# lazyadam's dense step against DeepSpeed's CPUAdam, alternated over many rounds, the order
# reversed every other round: the trials that three-round sittings cannot settle.
#
#   bash benches/dense_vs_deepspeed.sh OUT.jsonl [ROUNDS]
#
# Each round runs `peer-workloads --workload dense_16m` with the configurations in CONFIGS and
# benches/deepspeed_dense.py with DS_CONFIGS, both on THREADS threads (RAYON_NUM_THREADS for
# ours, torch's and OpenMP's for DeepSpeed). JSON lines go to OUT with "round" and "source"
# (lazyadam or deepspeed) added, DeepSpeed's check lines to OUT.stderr. Variables:
#   ROUNDS      (or the second argument, default 10)
#   THREADS     default 2
#   DS_CONFIGS  deepspeed_dense.py --configs (default: f32,f16-f32states,f16)
#   CONFIGS     peer-workloads configurations (default: those with DS_CONFIGS' storage, from
#               benches/deepspeed_configs.py, the table the summarizer pairs them by)
#   ANCHORS_PY  python of setup_anchors.sh (default: $HOME/.venvs/lazyadam-anchors/bin/python)
#   PEERS       the shared peers' directory (default: ../shared/peers beside the repository)
#
# The trials of 2026-12-06 in benches/README.md ran as:
#   THREADS=1 DS_CONFIGS=f32,bf16-f32states,bf16,f16-f32states,f16 \
#     bash benches/dense_vs_deepspeed.sh one-thread.jsonl 3
#   bash benches/dense_vs_deepspeed.sh dense-deepspeed.jsonl 10
# (then through edited copies of bench_anchors.py; this script replaces them). The first now
# also times lazyadam's two bf16 configurations, which that trial left out.
# Summarize with: python3 benches/summarize_sitting.py OUT.jsonl
set -euo pipefail
out=${1:?usage: dense_vs_deepspeed.sh OUT.jsonl [ROUNDS]}
rounds=${2:-${ROUNDS:-10}}
threads=${THREADS:-2}
ds_configs=${DS_CONFIGS:-f32,f16-f32states,f16}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${CONFIGS:-}" ]; then
    read -r -a configs <<<"$CONFIGS"
else
    mapfile -t configs < <(python3 "$root/benches/deepspeed_configs.py" lazyadam "$ds_configs")
    [ "${#configs[@]}" -gt 0 ] || exit 1
fi
peers=${PEERS:-$root/../shared/peers}
anchors_py=${ANCHORS_PY:-$HOME/.venvs/lazyadam-anchors/bin/python}

# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"
have "$anchors_py" deepspeed deepspeed || exit 1

cargo build --release -q -p lazyadam-benches --bin peer-workloads --manifest-path "$root/Cargo.toml"
bin=${CARGO_TARGET_DIR:-$root/target}/release
config_args=()
for c in "${configs[@]}"; do config_args+=(--config "$c"); done

ours() {
  tagged "$out" "$1" lazyadam env RAYON_NUM_THREADS="$threads" \
    "$bin/peer-workloads" --workload dense_16m "${config_args[@]}"
}
theirs() {
  tagged "$out" "$1" deepspeed env PEERS_DIR="$peers" \
    "$anchors_py" "$root/benches/deepspeed_dense.py" --threads "$threads" --configs "$ds_configs"
}

: >"$out"
: >"$out.stderr"
sitting_header "$out" "$rounds" "$root" experiment dense-vs-deepspeed threads "$threads"
for r in $(seq 1 "$rounds"); do
  echo "dense_vs_deepspeed: round $r of $rounds" >&2
  if [ $((r % 2)) -eq 1 ]; then
    ours "$r"
    theirs "$r"
  else
    theirs "$r"
    ours "$r"
  fi
done
echo "dense_vs_deepspeed: lines in $out, DeepSpeed's checks in $out.stderr" >&2
