#!/usr/bin/env bash
# Stop the local multi-node Ray cluster started by start.sh (same state dir).
# Safe to run twice. It never runs a bare `ray stop`: that kills EVERY Ray process on the
# machine (it matches process names, not temp dirs), including other people's clusters.
# Instead it kills the sessions recorded by start.sh (one per node; Ray's worker processes
# stay in their raylet's session), plus any leftover process whose command line names
# this state dir: SIGTERM, then SIGKILL after a grace period.
set -uo pipefail

STATE_DIR=${SEGRAY_CLUSTER_DIR:-/tmp/segray-cluster}
GRACE=${SEGRAY_STOP_GRACE:-5}
PURGE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --state-dir) STATE_DIR=$2; shift 2 ;;
    --grace) GRACE=$2; shift 2 ;;
    --purge) PURGE=1; shift ;;
    -h|--help)
      echo "usage: stop.sh [--state-dir DIR (env SEGRAY_CLUSTER_DIR, default /tmp/segray-cluster)]"
      echo "               [--grace SECONDS (env SEGRAY_STOP_GRACE, default 5)] [--purge: delete the state dir]"
      exit 0 ;;
    *) echo "stop.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

if [[ ! -d $STATE_DIR ]]; then
  echo "stop.sh: no state dir $STATE_DIR: nothing to stop"; exit 0
fi
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)

exec 9>"$STATE_DIR/.lock"
flock -w 60 9 || { echo "stop.sh: could not lock $STATE_DIR/.lock" >&2; exit 1; }

sids=()
for f in "$STATE_DIR"/*.sid; do
  [[ -f $f ]] || continue
  s=$(<"$f")
  [[ $s =~ ^[0-9]+$ ]] && (( s > 1 )) && sids+=("$s")
done

# PIDs of this cluster: in a recorded session, or naming "=<state dir>/" in their
# arguments (ray passes --temp-dir=..., --session-dir=..., --log_dir=...).
cluster_pids() {
  ps -eo pid=,sid=,stat=,args= 2>/dev/null | while read -r pid sid stat args; do
    [[ $pid == "$$" || $pid == "$BASHPID" || $stat == Z* ]] && continue
    for s in "${sids[@]}"; do
      if [[ $sid == "$s" ]]; then echo "$pid"; continue 2; fi
    done
    [[ $args == *"=$STATE_DIR/"* ]] && echo "$pid"
  done
}

is_gcs() { [[ $(ps -o args= -p "$1" 2>/dev/null) == *gcs_server* ]]; }
# Wait up to $1 seconds until no PID of the cluster is left except GCS (when $2=nogcs).
wait_gone() {
  local t p left
  for ((t = 0; t < $1 * 5; t++)); do
    left=0
    for p in $(cluster_pids); do
      if [[ $2 == nogcs ]] && is_gcs "$p"; then continue; fi
      left=1; break
    done
    (( left )) || return 0
    sleep 0.2
  done
  return 1
}

mapfile -t pids < <(cluster_pids)
if (( ${#pids[@]} )); then
  echo "stop.sh: stopping ${#pids[@]} process(es) of the cluster in $STATE_DIR"
  # Raylets and the other daemons first, while GCS still answers their unregistration:
  # Ray 2.60's gcs_server hangs on SIGTERM ("flushing remaining events") and a raylet
  # that outlives it then hangs too. GCS last: SIGTERM, and SIGKILL when it hangs.
  others=()
  for p in "${pids[@]}"; do is_gcs "$p" || others+=("$p"); done
  (( ${#others[@]} )) && kill -TERM "${others[@]}" 2>/dev/null
  wait_gone "$GRACE" nogcs
  mapfile -t pids < <(cluster_pids)
  (( ${#pids[@]} )) && kill -TERM "${pids[@]}" 2>/dev/null
  if ! wait_gone 1 all; then
    mapfile -t pids < <(cluster_pids)
    if (( ${#pids[@]} )); then
      echo "stop.sh: SIGKILL to ${#pids[@]} process(es) still alive"
      kill -KILL "${pids[@]}" 2>/dev/null
      wait_gone 5 all
    fi
  fi
else
  echo "stop.sh: no running process of the cluster in $STATE_DIR"
fi

# (Killed processes that nobody reaped yet, zombies, are not counted: they are gone.)
mapfile -t alive < <(cluster_pids)
if (( ${#alive[@]} )); then
  echo "stop.sh: could not stop: ${alive[*]}" >&2; exit 1
fi
rm -f "$STATE_DIR"/*.sid "$STATE_DIR/cluster.env"
if (( PURGE )); then
  flock -u 9
  rm -rf "$STATE_DIR"
fi
echo "stop.sh: stopped"
