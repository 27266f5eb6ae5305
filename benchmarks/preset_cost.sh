#!/usr/bin/env bash
# Wall time and peak RSS of the plain run, the brain preset and the preset with --pve on the
# 1 mm ICBM152 T1 x a 40 % field, in alternating rounds (benchmarks/README.md, "pv_fit", Cost).
# Needs the cached case: python benchmarks/realistic.py --cases t1-f40 --methods plain
#   ROUNDS=5 bash benchmarks/preset_cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
C=benchmarks/.cache/realistic_v1_r1
SEGMENT=${SEGMENT:-.venv/bin/segment}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for round in $(seq 1 "${ROUNDS:-5}"); do
  for run in plain preset pve; do
    case $run in
      plain) args=(-k 3) ;;
      preset) args=(-p t1-brain-3class) ;;
      pve) args=(-p t1-brain-3class --pve) ;;
    esac
    /usr/bin/time -f "%e %M" -o "$OUT/time" "$SEGMENT" run "$C/t1-f40.nii.gz" \
      --mask "$C/t1_mask.nii.gz" -o "$OUT/$run" --no-qc -q --overwrite "${args[@]}" > /dev/null
    read -r wall rss < "$OUT/time"
    stages=$(python3 -c "import json, sys; t = json.load(open(sys.argv[1]))['timings_s']; \
print(*(t.get(k, 0) for k in ('fit_s', 'pve_s', 'write_pve_s')))" "$OUT/$run/t1-f40_segment.json")
    echo "round $round $run wall_s=$wall peak_kb=$rss fit/pve/write_pve_s=$stages load=$(cut -d' ' -f1 /proc/loadavg)"
  done
done
