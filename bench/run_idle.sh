#!/usr/bin/env bash
# Run benchmark commands one at a time, each only once the machine is idle (1-minute load average below
# $IDLE_LOAD, waiting at most $IDLE_WAIT seconds, then running anyway and saying so: every script records
# the load itself). One command per line on stdin; a log line with the load before and after each.
# While the file $PAUSE_FILE exists no new command starts (the running one finishes): other work can
# use the machine between benchmarks without spoiling one.
#
#   printf '%s\n' "python bench/quantization.py" "python bench/pruning.py --sections search" | bench/run_idle.sh
set -u
IDLE_LOAD=${IDLE_LOAD:-0.3}
IDLE_WAIT=${IDLE_WAIT:-300}
PAUSE_FILE=${PAUSE_FILE:-/tmp/slimcart-bench.pause}
cd "$(dirname "$0")/.."
load() { cut -d' ' -f1 /proc/loadavg; }
while IFS= read -r cmd; do
  [ -z "$cmd" ] && continue
  while [ -e "$PAUSE_FILE" ]; do sleep 5; done
  waited=0
  while [ -e "$PAUSE_FILE" ] || { awk -v l="$(load)" -v t="$IDLE_LOAD" 'BEGIN{exit !(l >= t)}' && [ "$waited" -lt "$IDLE_WAIT" ]; }; do
    sleep 10; waited=$((waited + 10))  # a pause set while waiting for idle holds the start too
  done
  echo "[$(date +%H:%M:%S)] load $(load) (waited ${waited}s): $cmd"
  start=$(date +%s)
  bash -c "$cmd" < /dev/null  # the queue is on stdin: a command must not read it
  rc=$?
  echo "[$(date +%H:%M:%S)] load $(load) rc=$rc after $(( $(date +%s) - start ))s: $cmd"
done
