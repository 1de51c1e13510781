#!/usr/bin/env bash
# Start a real multi-node Ray cluster on one machine: a head (dashboard / Jobs API on
# 127.0.0.1) and N worker nodes on 127.0.0.2, 127.0.0.3, ... (Linux routes all of
# 127.0.0.0/8 to loopback). The head's node IP is what Ray makes of 127.0.0.1: the
# machine's own IP (see below).
# Every node is its own `ray start` with its own --temp-dir under the state dir, run in
# its own session (setsid) so that stop.sh can kill exactly this cluster's processes.
# See cluster/local/README.md. Stop it with cluster/local/stop.sh (same state dir).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: start.sh [options]
  -w, --workers N          worker nodes (env SEGRAY_NUM_WORKERS, default 1)
      --head-cpus N        CPUs of the head (env SEGRAY_HEAD_CPUS, default 1)
      --worker-cpus N      CPUs of each worker (env SEGRAY_WORKER_CPUS, default 1)
      --gcs-port P|auto    GCS port (env SEGRAY_GCS_PORT, default 6379)
      --dashboard-port P|auto  dashboard / Jobs API port (env SEGRAY_DASHBOARD_PORT, default 8265)
      --object-store-mb M|auto object store per node in MiB (env SEGRAY_OBJECT_STORE_MB, default 2048;
                           auto = Ray's default, 30% of RAM per node)
      --state-dir DIR      state dir (env SEGRAY_CLUSTER_DIR, default /tmp/segray-cluster)
      --timeout S          seconds to wait for all nodes (env SEGRAY_START_TIMEOUT, default 180)
  Ray CLI / Python: env SEGRAY_RAY (default: `ray` on PATH), SEGRAY_PYTHON (default: the
  python next to that ray, else python3). RAY_AUTH_MODE is passed through to every node
  (unset: "disabled", see below). Prints SEGRAY_GCS_ADDRESS / SEGRAY_DASHBOARD_URL, also
  written to <state dir>/cluster.env.
USAGE
}

STATE_DIR=${SEGRAY_CLUSTER_DIR:-/tmp/segray-cluster}
NUM_WORKERS=${SEGRAY_NUM_WORKERS:-1}
HEAD_CPUS=${SEGRAY_HEAD_CPUS:-1}
WORKER_CPUS=${SEGRAY_WORKER_CPUS:-1}
GCS_PORT=${SEGRAY_GCS_PORT:-6379}
DASHBOARD_PORT=${SEGRAY_DASHBOARD_PORT:-8265}
OBJECT_STORE_MB=${SEGRAY_OBJECT_STORE_MB:-2048}
TIMEOUT=${SEGRAY_START_TIMEOUT:-180}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -w|--workers) NUM_WORKERS=$2; shift 2 ;;
    --head-cpus) HEAD_CPUS=$2; shift 2 ;;
    --worker-cpus) WORKER_CPUS=$2; shift 2 ;;
    --gcs-port) GCS_PORT=$2; shift 2 ;;
    --dashboard-port) DASHBOARD_PORT=$2; shift 2 ;;
    --object-store-mb) OBJECT_STORE_MB=$2; shift 2 ;;
    --state-dir) STATE_DIR=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
for v in NUM_WORKERS HEAD_CPUS WORKER_CPUS TIMEOUT; do
  is_uint "${!v}" || { echo "start.sh: $v must be a non-negative integer (ray start --num-cpus takes integers), got '${!v}'" >&2; exit 2; }
done
if (( NUM_WORKERS > 253 )); then echo "start.sh: at most 253 workers (127.0.0.2-254)" >&2; exit 2; fi

RAY=${SEGRAY_RAY:-$(command -v ray || true)}
[[ -n $RAY && -x $RAY ]] || { echo "start.sh: ray CLI not found (set SEGRAY_RAY)" >&2; exit 2; }
if [[ -z ${SEGRAY_PYTHON:-} ]]; then
  if [[ -x $(dirname "$RAY")/python ]]; then SEGRAY_PYTHON=$(dirname "$RAY")/python; else SEGRAY_PYTHON=python3; fi
fi
PY=$SEGRAY_PYTHON
# Absolute paths: the nodes are started from the state dir.
RAY=$(cd "$(dirname "$RAY")" && pwd)/$(basename "$RAY")
if [[ $PY == */* ]]; then PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY"); fi
# `python` in job entrypoints (`ray job submit -- python jobs/train.py ...`) is looked up on
# the nodes' PATH: make it the interpreter that runs Ray, even if its venv is not active.
if [[ $PY == /* ]]; then export PATH="$(dirname "$PY"):$PATH"; fi
# An inherited RAY_ADDRESS would point our commands at someone else's cluster.
unset RAY_ADDRESS
# Every command of the cluster (head, workers, the readiness check) and every client must
# use the same auth mode. Ray 2.60 leaves it ambiguous when RAY_AUTH_MODE is unset:
# `ray start --head` turns token auth on if ~/.ray/auth_token exists, but `ray start
# --address=...` and `ray.init(address=...)` with an explicit address never do, so the
# workers could not join. Hence: pass RAY_AUTH_MODE through when set, else pin "disabled"
# (what an explicit-address client assumes); it is recorded in cluster.env.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

STATE_DIR=$(realpath -m "$STATE_DIR")
# Ray's unix sockets, <state dir>/workerN/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store,
# must fit in 107 bytes (with a 7-digit pid, the worst case).
suffix="/worker$NUM_WORKERS/session_2000-01-01_00-00-00_000000_1234567/sockets/plasma_store"
if (( ${#STATE_DIR} + ${#suffix} > 107 )); then
  echo "start.sh: state dir path '$STATE_DIR' is too long for Ray's unix sockets" \
       "(max $((107 - ${#suffix})) characters)" >&2; exit 2
fi
mkdir -p "$STATE_DIR"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

exec 9>"$STATE_DIR/.lock"
flock -n 9 || { echo "start.sh: another start/stop holds $STATE_DIR/.lock" >&2; exit 1; }

if compgen -G "$STATE_DIR/*.sid" >/dev/null; then
  echo "start.sh: $STATE_DIR already has a cluster (run stop.sh --state-dir $STATE_DIR first)" >&2; exit 1
fi
rm -f "$STATE_DIR/cluster.env"

# Pick ports: 'auto' (or 0) means a free one; fixed ones must be free, or the dashboard
# would silently move to another port (it retries) and GCS would collide.
# Also pick a free dashboard-agent HTTP port per node and the Ray client port: their
# defaults (52365, 10001) are fixed and would collide between nodes/other clusters.
read -r GCS_PORT DASHBOARD_PORT CLIENT_PORT AGENT_PORTS < <("$PY" - "$GCS_PORT" "$DASHBOARD_PORT" "$NUM_WORKERS" <<'PYEOF'
import socket, sys
held = []
def free():
    s = socket.socket(); s.bind(("", 0)); held.append(s); return s.getsockname()[1]
def fixed(p, what):
    if p in ("auto", "0"):
        return free()
    s = socket.socket()
    try:
        s.bind(("", int(p)))
    except OSError:
        sys.exit(f"start.sh: {what} port {p} is in use (pass auto or another port)")
    held.append(s); return int(p)
gcs = fixed(sys.argv[1], "GCS"); dash = fixed(sys.argv[2], "dashboard")
client = free()
agents = [free() for _ in range(int(sys.argv[3]) + 1)]
print(gcs, dash, client, ",".join(map(str, agents)))
PYEOF
)
[[ -n ${AGENT_PORTS:-} ]] || exit 1
IFS=, read -r -a AGENT_PORT <<<"$AGENT_PORTS"

OBJ_ARGS=()
if [[ $OBJECT_STORE_MB != auto ]]; then
  is_uint "$OBJECT_STORE_MB" || { echo "start.sh: --object-store-mb must be an integer or auto" >&2; exit 2; }
  OBJ_ARGS=(--object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)))
fi

cleanup_on_error() {
  local rc=$?
  if (( rc != 0 )); then
    echo "start.sh: failed (rc=$rc); logs:" >&2
    for f in "$STATE_DIR"/*.log; do [[ -f $f ]] && { echo "--- $f" >&2; tail -n 30 "$f" >&2; }; done
    flock -u 9 || true
    SEGRAY_CLUSTER_DIR=$STATE_DIR "$HERE/stop.sh" >&2 || true
  fi
}
trap cleanup_on_error EXIT

# Run one `ray start` in its own session; the session id (= pid of the inner bash, a
# session leader) is recorded first so stop.sh can find every process of that node,
# including Ray worker processes that get their own process groups.
# The node's processes (and job drivers without a working_dir) inherit its cwd: the
# state dir, the same wherever start.sh was called from.
# RAY_num_workers_soft_limit: how many workers the raylet keeps before it kills idle ones. Unset,
# fractional-CPU task workers were killed between blocks and restarted under actor pools
# (benchmarks/README.md); segray.runtime.node_env gives the same rule.
start_node() {  # name, CPUs, ray start args...
  local name=$1 cpus=$2; shift 2
  cd "$STATE_DIR"
  RAY_num_workers_soft_limit=${RAY_num_workers_soft_limit:-$((2 * cpus + 4))} \
  setsid --wait bash -c 'echo $$ > "$0"; exec "$@"' "$STATE_DIR/$name.sid" \
    timeout "$TIMEOUT" "$RAY" start --disable-usage-stats --num-gpus=0 "${OBJ_ARGS[@]}" "$@" \
    >"$STATE_DIR/$name.log" 2>&1 9>&-   # the nodes must not hold the state-dir lock
}

DASHBOARD_URL=http://127.0.0.1:$DASHBOARD_PORT
echo "start.sh: head (GCS :$GCS_PORT, dashboard 127.0.0.1:$DASHBOARD_PORT, $HEAD_CPUS CPU)"
# No --node-ip-address for the head: Ray 2.60 rewrites 127.0.0.1/localhost to the
# machine's routable IP anyway (services.resolve_ip_for_localhost), and it does the same
# to every address "127.0.0.1:<port>" a worker or driver is given. So the head lives at
# that IP (127.0.0.1 only on a machine without one), its GCS listens on all interfaces
# and 127.0.0.1:<port> reaches it; the workers get the other loopback addresses.
start_node head "$HEAD_CPUS" --head \
  --port="$GCS_PORT" \
  --temp-dir="$STATE_DIR/head" \
  --num-cpus="$HEAD_CPUS" --resources='{"segray_head": 1}' \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --dashboard-agent-listen-port="${AGENT_PORT[0]}" --ray-client-server-port="$CLIENT_PORT"

pids=()
for ((i = 1; i <= NUM_WORKERS; i++)); do
  ip=127.0.0.$((i + 1))
  echo "start.sh: worker$i $ip ($WORKER_CPUS CPU)"
  start_node "worker$i" "$WORKER_CPUS" --address="127.0.0.1:$GCS_PORT" \
    --node-ip-address="$ip" \
    --temp-dir="$STATE_DIR/worker$i" \
    --num-cpus="$WORKER_CPUS" --resources="{\"segray_worker\": 1, \"segray_worker$i\": 1}" \
    --dashboard-agent-listen-port="${AGENT_PORT[$i]}" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done

# Wait until the head and all workers are alive (workers at their loopback IPs), the
# dashboard GCS knows is ours, and the Jobs API answers. Prints the head's node IP.
HEAD_IP=$("$PY" - "127.0.0.1:$GCS_PORT" "$DASHBOARD_URL" "$NUM_WORKERS" "$TIMEOUT" <<'PYEOF'
import logging, sys, time
gcs, dash, n, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout
import ray
from ray.job_submission import JobSubmissionClient
want_workers = {f"127.0.0.{i + 2}" for i in range(n)}
ctx = ray.init(address=gcs, logging_level=logging.ERROR, log_to_driver=False,
               configure_logging=False)
try:
    while True:
        alive = [x for x in ray.nodes() if x["Alive"]]
        heads = [x["NodeManagerAddress"] for x in alive if "segray_head" in x["Resources"]]
        workers = {x["NodeManagerAddress"] for x in alive if "segray_worker" in x["Resources"]}
        if len(heads) == 1 and workers == want_workers and len(alive) == n + 1:
            break
        if time.monotonic() > deadline:
            sys.exit(f"start.sh: timeout: alive head {heads}, workers {sorted(workers)}, "
                     f"want workers {sorted(want_workers)}")
        time.sleep(0.5)
    got = (ctx.dashboard_url or "").removeprefix("http://")
    if got != dash.removeprefix("http://"):
        sys.exit(f"start.sh: dashboard is at {got!r}, expected {dash!r}")
finally:
    ray.shutdown()
while True:
    try:
        JobSubmissionClient(dash).list_jobs()
        break
    except Exception as e:  # dashboard modules still starting
        if time.monotonic() > deadline:
            sys.exit(f"start.sh: timeout: Jobs API at {dash} not answering: {e}")
        time.sleep(0.5)
print(heads[0])
PYEOF
)
GCS_ADDRESS=$HEAD_IP:$GCS_PORT

cat >"$STATE_DIR/cluster.env" <<ENV
SEGRAY_GCS_ADDRESS=$GCS_ADDRESS
SEGRAY_DASHBOARD_URL=$DASHBOARD_URL
SEGRAY_HEAD_IP=$HEAD_IP
SEGRAY_NUM_WORKERS=$NUM_WORKERS
SEGRAY_HEAD_CPUS=$HEAD_CPUS
SEGRAY_WORKER_CPUS=$WORKER_CPUS
RAY_AUTH_MODE=$RAY_AUTH_MODE
ENV

trap - EXIT
echo "start.sh: cluster up: head $HEAD_IP + $NUM_WORKERS worker(s), state $STATE_DIR"
echo "SEGRAY_GCS_ADDRESS=$GCS_ADDRESS"
echo "SEGRAY_DASHBOARD_URL=$DASHBOARD_URL"
echo "RAY_AUTH_MODE=$RAY_AUTH_MODE  # clients must use the same mode"
echo "# ray.init(address=\"$GCS_ADDRESS\");  RAY_ADDRESS=$DASHBOARD_URL ray job submit --working-dir . -- python jobs/train.py configs/demo_train.yaml"
