# Shell helpers shared by benches/sitting.sh and benches/dense_vs_deepspeed.sh (sourced, not run).

# tagged OUT ROUND SOURCE CMD...: runs CMD; copies its JSON lines to OUT (and to stdout) with
# "round" and "source" added; its stderr goes to stderr and to OUT.stderr.
tagged() {
  local out=$1 round=$2 source=$3
  shift 3
  "$@" 2> >(tee -a "$out.stderr" >&2) | python3 -c '
import json, sys
r, s = int(sys.argv[1]), sys.argv[2]
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        d = json.loads(line); d["round"] = r; d["source"] = s
        print(json.dumps(d, sort_keys=True), flush=True)
' "$round" "$source" | tee -a "$out"
}

# have PYTHON MODULE NAME: whether PYTHON exists and imports MODULE; says on stderr that NAME
# is skipped when not.
have() {
  if [ -x "$1" ] && "$1" -c "import $2" 2>/dev/null; then return 0; fi
  echo "$(basename "$0"): $3 skipped ($1 cannot import $2)" >&2
  return 1
}

# sitting_header OUT ROUNDS ROOT [KEY VALUE]...: the first line of OUT: date, CPU, cores, rounds,
# commit, and any extra string fields.
sitting_header() {
  local out=$1 rounds=$2 root=$3
  shift 3
  python3 -c '
import json, os, subprocess, sys, time
rounds, root, extra = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
d = {"kind": "sitting", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu,
     "cores": len(os.sched_getaffinity(0)), "rounds": rounds,
     "commit": subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()}
d.update(zip(extra[::2], extra[1::2]))
print(json.dumps(d))
' "$rounds" "$root" "$@" >>"$out"
}
