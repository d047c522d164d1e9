#!/usr/bin/env bash
# One sitting: lazyadam and the peers, interleaved, over several rounds, on one machine.
#
#   bash benches/sitting.sh OUT.jsonl [ROUNDS]
#
# Every round runs, one after the other: torch (bench_peers.py torch), TensorFlow Addons
# (bench_peers.py tf), DeepSpeed's CPUAdam (bench_anchors.py deepspeed dense_16m), FBGEMM
# (bench_anchors.py fbgemm sparse_1m_d64 sparse_100k_d16), lazyadam's peer-workloads (every
# workload and storage configuration) and serial-fraction (one round). Each JSON line is copied
# to OUT with "round" and "source" added. A peer whose environment is missing is skipped, said
# on stderr. Environments (override with the variables):
#   TORCH_PY   python with torch            (default: the anchors' venv)
#   ANCHORS_PY python of setup_anchors.sh   (default: $HOME/.venvs/lazyadam-anchors/bin/python)
#   TF_PY      python with tensorflow-cpu==2.15.1, tensorflow-addons==0.23.0, numpy<2
#              (default: $HOME/.venvs/tf/bin/python)
#   PEERS      the shared peers' directory  (default: ../shared/peers beside the repository)
#   QUICK=1    lazyadam's benches in quick mode (CI runs the script so; the figures are then
#              not measurements)
set -euo pipefail
out=${1:?usage: sitting.sh OUT.jsonl [ROUNDS]}
rounds=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
peers=${PEERS:-$root/../shared/peers}
anchors_py=${ANCHORS_PY:-$HOME/.venvs/lazyadam-anchors/bin/python}
torch_py=${TORCH_PY:-$anchors_py}
tf_py=${TF_PY:-$HOME/.venvs/tf/bin/python}

cargo build --release -q -p lazyadam-benches --bin peer-workloads --bin serial-fraction \
  --manifest-path "$root/Cargo.toml"
bin=${CARGO_TARGET_DIR:-$root/target}/release
quick=()
if [ "${QUICK:-0}" = "1" ]; then quick=(--quick); fi

# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"

: >"$out"
: >"$out.stderr"
sitting_header "$out" "$rounds" "$root"
for r in $(seq 1 "$rounds"); do
  echo "sitting: round $r of $rounds" >&2
  if have "$torch_py" torch torch; then
    tagged "$out" "$r" torch "$torch_py" "$peers/bench_peers.py" torch
  fi
  if have "$tf_py" tensorflow_addons tf; then
    tagged "$out" "$r" tf "$tf_py" "$peers/bench_peers.py" tf
  fi
  if have "$anchors_py" deepspeed deepspeed; then
    tagged "$out" "$r" deepspeed "$anchors_py" "$peers/bench_anchors.py" deepspeed dense_16m
  fi
  if have "$anchors_py" fbgemm_gpu fbgemm; then
    tagged "$out" "$r" fbgemm "$anchors_py" "$peers/bench_anchors.py" fbgemm sparse_1m_d64 sparse_100k_d16
  fi
  tagged "$out" "$r" lazyadam "$bin/peer-workloads" "${quick[@]}"
  tagged "$out" "$r" serial-fraction "$bin/serial-fraction" --rounds 1 "${quick[@]}"
done
echo "sitting: lines in $out, peers' stderr (their correctness checks) in $out.stderr" >&2
