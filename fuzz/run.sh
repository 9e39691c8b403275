#!/usr/bin/env bash
# Run the atheris harness of every reader (fuzz/fuzz_<reader>.py), one after the other.
#
#   fuzz/run.sh [SECONDS_OR_RUNS] [READER...]
#     60          60 seconds per reader (the default); "90s" works too
#     1000000runs one million executions per reader
#     READER...   only these (raw elf kdump lime avml snapshot firecracker firecracker_diff cloud_hypervisor openvmm vmrs vmware windows wrapped); default: every fuzz_*.py
#
# Environment: JOBS=2 runs two readers at a time; KSM_FUZZ_KEEP_GOING=0 stops a reader at its
# first failure (libFuzzer's crash-<sha1> artifact) instead of saving each distinct failure
# and going on; KSM_FUZZ_ANALYZE=1 also runs analyze() on every input (about 50x slower).
# Needs `pip install atheris` (and the dev extras). Output in fuzz/out/ (not committed):
# <reader>.log, <reader>/failures.txt and the failing inputs, and summary.txt.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
budget=${1:-60}
shift $(( $# > 0 ? 1 : 0 ))
case $budget in
  *runs) limit=(-runs="${budget%runs}") ;;
  *s) limit=(-max_total_time="${budget%s}") ;;
  *) limit=(-max_total_time="$budget") ;;
esac
if [ $# -gt 0 ]; then
  readers=("$@")
else
  readers=()
  for f in "$here"/fuzz_*.py; do r=${f##*/fuzz_}; readers+=("${r%.py}"); done
fi
out=${KSM_FUZZ_OUT:-$here/out}
python=${PYTHON:-python}
"$python" -c "import atheris" 2>/dev/null || { echo "atheris is missing: pip install atheris" >&2; exit 2; }
mkdir -p "$out"
[ -d "$here/corpus" ] || "$python" "$here/make_corpus.py" "$here/corpus" || exit 2

run_one() {
  local r=$1 dict=() started status execs rate failures hangs
  [ -s "$here/corpus/$r.dict" ] && dict=(-dict="$here/corpus/$r.dict")
  mkdir -p "$out/$r/corpus"
  : > "$out/$r/failures.txt"
  started=$(date -u +%FT%TZ)
  KSM_FUZZ_KEEP_GOING=${KSM_FUZZ_KEEP_GOING:-1} KSM_FUZZ_OUT="$out/$r" \
    "$python" "$here/fuzz_$r.py" "${limit[@]}" -timeout=10 -rss_limit_mb=3072 -max_len=65536 \
    -use_value_profile=1 -print_final_stats=1 -artifact_prefix="$out/$r/" "${dict[@]}" \
    "$out/$r/corpus" "$here/corpus/$r" > "$out/$r.log" 2>&1
  status=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/$r.log" | grep -o '[0-9]*$')
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$out/$r.log" | grep -o '[0-9]*$')
  failures=$(grep -c . "$out/$r/failures.txt")
  hangs=$(grep -c -e 'ALARM: working on the last Unit' -e 'ERROR: libFuzzer: timeout' "$out/$r.log")
  printf '%s %-9s executions=%s exec/s=%s failures=%s hangs=%s exit=%s  (%s)\n' \
    "$started" "$r" "${execs:-?}" "${rate:-?}" "$failures" "$hangs" "$status" \
    "fuzz/run.sh ${budget} $r" | tee -a "$out/summary.txt"
}

jobs_max=${JOBS:-1}
for r in "${readers[@]}"; do
  [ -f "$here/fuzz_$r.py" ] || { echo "no harness fuzz/fuzz_$r.py" >&2; exit 2; }
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
  run_one "$r" &
done
wait
if grep -q . "$out"/*/failures.txt 2>/dev/null; then
  echo "failures (inputs beside each list):"; cat "$out"/*/failures.txt
  exit 1
fi
