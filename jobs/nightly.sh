#!/usr/bin/env bash
# Submit one day's classify run to a Ray cluster, retrying a failed run a bounded number of
# times. Two runs of the same day never overlap: the job itself holds a lock in its output
# folder (clsjob/run/lock.py), so a second submission fails at once instead of mixing rows, and a
# retry after a killed run resumes its unfinished shards rather than starting over.
#
#   jobs/nightly.sh CONFIG [YYYY-MM-DD]       the date defaults to yesterday (UTC)
#
# CONFIG is a path inside this repo (the repo is uploaded as the job's working dir), whose
# paths use {date} templates: see configs/classify-nightly.yaml, whose monitor.baseline
# ({date-1}) compares each day's labels with the day before's.
#
# Exit codes: 0 done; 1 every try failed; 3 the day is done but its labels drifted past
# monitor.fail_above (not retried: a rerun would find the same drift).
# Environment:
#   RAY_ADDRESS          the cluster's dashboard, e.g. http://head:8265 (as for `ray job submit`)
#   CLSJOB_TRIES         submissions before giving up (default 3)
#   CLSJOB_RETRY_WAIT_S  seconds before the first retry, doubled each time (default 300)
#   CLSJOB_RAY           the ray CLI to use (default: `ray` on PATH)
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 CONFIG [YYYY-MM-DD]" >&2
    exit 64
fi
config=$1
day=${2:-$(date -u -d yesterday +%F)}
if ! [[ $day =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]]; then
    echo "nightly: date must be YYYY-MM-DD, got '$day'" >&2
    exit 64
fi
tries=${CLSJOB_TRIES:-3}
wait_s=${CLSJOB_RETRY_WAIT_S:-300}
ray=${CLSJOB_RAY:-ray}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
name=$(basename "$config" .yaml)

for attempt in $(seq 1 "$tries"); do
    # Submission ids are unique per cluster: one per attempt, readable in the dashboard.
    id="clsjob-$name-$day-try$attempt-$(date -u +%H%M%S)"
    echo "nightly: $day attempt $attempt/$tries as $id" >&2
    # `ray job submit` waits for the job and exits non-zero when it fails; it prints the
    # entry point's exit code, which tells a drift alert (3) from a failure.
    log=$(mktemp)
    if "$ray" job submit --submission-id "$id" --working-dir "$repo" -- \
        python jobs/classify.py --config "$config" --date "$day" | tee "$log"; then
        rm -f "$log"
        echo "nightly: $day done" >&2
        exit 0
    fi
    if grep -q "failed with exit code 3" "$log"; then
        rm -f "$log"
        echo "nightly: $day done, but its labels drifted past monitor.fail_above (see its manifest)" >&2
        exit 3
    fi
    rm -f "$log"
    if [[ $attempt -lt $tries ]]; then
        echo "nightly: $day attempt $attempt failed; retrying in ${wait_s}s" >&2
        sleep "$wait_s"
        wait_s=$((wait_s * 2))
    fi
done
echo "nightly: $day failed $tries times; giving up" >&2
exit 1
