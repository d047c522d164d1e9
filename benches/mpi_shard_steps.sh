#!/usr/bin/env bash
# Sharded sparse steps between MPI processes, unclipped and clipped, alternated over rounds:
# frontends/mpi's `shard_steps` example (the shape of sparse_1m_d64) under mpirun, on 1 rank
# of THREADS threads and on 2 and 4 ranks of one thread each (4 oversubscribe a 2-core
# machine), each with no clipping, `--clipnorm 1` and `--global-clipnorm 1` (the gradient's
# norm is about 590, so both clip every step). The order of the nine runs is reversed every
# other round.
#
#   bash benches/mpi_shard_steps.sh OUT.jsonl [ROUNDS]
#
# Needs Open MPI and libclang (see frontends/mpi/README.md). JSON lines go to OUT with "round"
# and "source" (mpi) added; a table of medians over the rounds, and of each clipped step's
# time over the unclipped one's within a round, is printed at the end. Variables: ROUNDS (or
# the second argument, default 5), THREADS (the one rank's threads, default 2), REPS (steps
# timed per run, default 40), EXE (a `shard_steps` already built, used as it is; by default
# the release build, built first; CI passes its debug build so that this script cannot rot),
# GLIBC_TUNABLES (passed on to the ranks when set, and written in the header line: see
# frontends/mpi/README.md on glibc's allocation threshold under Open MPI), ARGS (more options
# for every run, such as --scatter; written in the header line).
set -euo pipefail
out=${1:?usage: mpi_shard_steps.sh OUT.jsonl [ROUNDS]}
rounds=${2:-${ROUNDS:-5}}
threads=${THREADS:-2}
reps=${REPS:-40}
read -r -a extra <<<"${ARGS:-}"
root=$(cd "$(dirname "$0")/.." && pwd)
manifest=$root/frontends/mpi/Cargo.toml

# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"
command -v mpirun >/dev/null || { echo "mpi_shard_steps.sh: mpirun not found" >&2; exit 1; }

if [ -n "${EXE:-}" ]; then
  exe=$EXE
else
  cargo build --release -q --example shard_steps --manifest-path "$manifest"
  exe=$(dirname "$manifest")/target/release/examples/shard_steps
fi
# Open MPI refuses to run as root without these (and --allow-run-as-root).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

runs=()
for layout in "1 $threads" "2 1" "4 1"; do
  for opt in "" "--clipnorm 1" "--global-clipnorm 1"; do
    runs+=("$layout|$opt")
  done
done

: >"$out"
: >"$out.stderr"
sitting_header "$out" "$rounds" "$root" experiment mpi-shard-steps reps "$reps" \
  glibc_tunables "${GLIBC_TUNABLES:-}" args "${ARGS:-}"
pass=(-x RAYON_NUM_THREADS)
if [ -n "${GLIBC_TUNABLES:-}" ]; then pass+=(-x GLIBC_TUNABLES); fi
for r in $(seq 1 "$rounds"); do
  echo "mpi_shard_steps: round $r of $rounds" >&2
  order=("${runs[@]}")
  if [ $((r % 2)) -eq 0 ]; then
    order=()
    for ((k = ${#runs[@]} - 1; k >= 0; k--)); do order+=("${runs[$k]}"); done
  fi
  for run in "${order[@]}"; do
    read -r np th <<<"${run%%|*}"
    read -r -a opt <<<"${run#*|}"
    # --bind-to none: Open MPI binds each of up to two ranks to a core by default, which would
    # put the one rank's threads on one core.
    tagged "$out" "$r" mpi env RAYON_NUM_THREADS="$th" mpirun -np "$np" --oversubscribe \
      --bind-to none --allow-run-as-root "${pass[@]}" "$exe" --reps "$reps" "${opt[@]}" \
      "${extra[@]}" >/dev/null
  done
done

python3 - "$out" <<'EOF'
import collections, json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [d for d in lines if d.get("kind") == "mpi_shard_step"]
def option(d):
    if d["clipnorm"] is not None:
        return f"--clipnorm {d['clipnorm']:g}"
    if d["global_clipnorm"] is not None:
        return f"--global-clipnorm {d['global_clipnorm']:g}"
    return "none"
by = collections.defaultdict(dict)  # (ranks, threads, option) -> round -> ms
for d in steps:
    by[(d["ranks"], d["threads_per_rank"], option(d))][d["round"]] = d["median_ms_slowest_rank"]
print("| ranks x threads | clipping | median ms (range over rounds) | over unclipped, per round |")
print("| --- | --- | --- | --- |")
for (ranks, th, opt), t in sorted(by.items()):
    base = by.get((ranks, th, "none"), {})
    ratios = [t[r] / base[r] for r in t if r in base]
    ratio = "" if opt == "none" or not ratios else \
        f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}x-{max(ratios):.2f}x)"
    v = list(t.values())
    print(f"| {ranks} x {th} | {opt} | {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f}) | {ratio} |")
EOF
