#!/usr/bin/env bash
# A three-node Ray cluster on this machine, to try prism-ray the way a cluster runs it: a head that runs the
# drivers (no CPUs for work, like a KubeRay head) and two worker nodes, all on 127.0.0.1, token auth on.
#
#   cluster/local.sh up       start it, print the `ray job submit` line to use
#   cluster/local.sh status   list its nodes
#   cluster/local.sh down     stop exactly the processes `up` started
#
# Settings (environment): PRISM_LOCAL_CLUSTER  state folder: token, pids, logs (default /tmp/prism-ray-local-$USER)
#   WORKERS (2) worker nodes, WORKER_CPUS (1) and WORKER_GPUS (0) each (GPUs here are Ray resources only: set
#   PRISM_RAY_FAKE_GPUS=1 in the job's environment to use them), GCS_PORT (6390), DASHBOARD_PORT (8275),
#   METRICS_PORT (8276, the head's Prometheus endpoint), RAY (default: this project's .venv/bin/ray, else ray),
#   STOP_SECONDS (60: how long `down` lets a node stop before it kills every process the node started).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${PRISM_LOCAL_CLUSTER:-/tmp/prism-ray-local-${USER:-$(id -un)}}"
WORKERS="${WORKERS:-2}" WORKER_CPUS="${WORKER_CPUS:-1}" WORKER_GPUS="${WORKER_GPUS:-0}"
GCS_PORT="${GCS_PORT:-6390}" DASHBOARD_PORT="${DASHBOARD_PORT:-8275}" METRICS_PORT="${METRICS_PORT:-8276}"
STOP_SECONDS="${STOP_SECONDS:-60}"

find_ray() {  # RAY, and PYTHON: the interpreter of that ray (a console script), whose environment the nodes use
  if [ -z "${RAY:-}" ]; then
    if [ -x "$here/.venv/bin/ray" ]; then RAY="$here/.venv/bin/ray"; else RAY="$(command -v ray)" || {
      say "local.sh: no ray: create the project's .venv (make setup) or set RAY" >&2; exit 2; }; fi
  fi
  PYTHON="$(head -n 1 "$RAY" | sed 's/^#! *//')"
}
# Ray's session sockets must fit in 107 bytes: keep its temp folders short, one per state folder, and one per
# node (nodes of one host sharing a temp folder collide on the object store's socket).
ray_tmp="/tmp/prism-ray-local-$(printf %s "$state" | cksum | cut -d ' ' -f 1)"

export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/auth_token"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
# SIGTERM to `ray start --block` drains the node for 30 s by default before stopping it: `down` is for now.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

# `ray start --address=127.0.0.1:PORT --node-ip-address=127.0.0.1` swaps 127.0.0.1 for the machine's interface
# address, in both, and a head bound to loopback does not listen there. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which
# stops the swap, also refuses worker nodes; 127.1 (127.0.0.1 written short) is not swapped but Ray's gRPC does not
# resolve it; [::ffff:127.0.0.1] joins, but the node still registers at the interface address. There is no public
# way (Ray 2.60): worker nodes run Ray's own CLI with its one resolving function (private) keeping addresses as
# given, and say so plainly if a Ray release renames it.
keep_loopback='import sys, ray._private.services as s
if not hasattr(s, "resolve_ip_for_localhost"):
    sys.exit("local.sh: this Ray has no ray._private.services.resolve_ip_for_localhost: worker nodes cannot stay on 127.0.0.1")
s.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()'

say() { printf '%s\n' "$*"; }

alive() {  # alive PIDFILE: the recorded process still runs and is the `ray start --block` we started
  local pid
  [ -f "$1" ] || return 1
  pid="$(cat "$1")"
  kill -0 "$pid" 2>/dev/null || return 1
  local cmd
  cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" || return 1
  case "$cmd" in *" start "*"--block"*) return 0 ;; *) return 1 ;; esac
}

submit_line() {
  # `python` is the first on the head's PATH when the job starts there: this environment's (see up)
  say "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$state/auth_token $RAY job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir $here -- python -m prism_ray run jobs/configs/fmnist-demo.yaml --set run.output=$here/runs/fmnist-demo"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds
  local deadline=$(( $(date +%s) + $1 )) what="$2"
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "local.sh: $what did not happen within the time allowed; logs: $state/*.log" >&2
      return 1
    fi
    sleep 1
  done
}

dashboard_up() {  # the job server answers (401 without a token still means it is up)
  "$PYTHON" - "$DASHBOARD_PORT" <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=2)
except urllib.error.HTTPError:
    pass
PY
}

nodes_alive() {  # nodes_alive N: N nodes are alive
  "$RAY" list nodes --address "http://127.0.0.1:$DASHBOARD_PORT" --format json 2>/dev/null \
    | "$PYTHON" -c 'import json, sys; sys.exit(sum(n["state"] == "ALIVE" for n in json.load(sys.stdin)) < int(sys.argv[1]))' "$1"
}

listening() {  # listening PORT: something accepts connections on 127.0.0.1:PORT
  "$PYTHON" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()' "$1"
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

up() {
  mkdir -p "$state"
  if alive "$state/head.pid"; then
    say "local Ray cluster already up (state in $state). Submit a run with:"
    submit_line
    return 0
  fi
  if [ ! -s "$state/auth_token" ]; then
    (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$state/auth_token")
  fi
  # The nodes, and so the jobs they run, find this environment's python (and its torch) first on their PATH,
  # whatever the shell that runs `up` or submits a job has activated.
  export PATH="$(dirname "$PYTHON"):$PATH"
  # The head binds to loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 as its address. Ports
  # with fixed defaults (agent 52365, client 10001) are picked free: another Ray on this machine may hold them.
  local head_agent_port
  head_agent_port="$(free_port)"
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 setsid "$RAY" start --head --block --node-ip-address=127.0.0.1 \
    --node-name=local-head --port="$GCS_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --metrics-export-port="$METRICS_PORT" --num-cpus=0 --num-gpus=0 --temp-dir="$ray_tmp/head" \
    --dashboard-agent-listen-port="$head_agent_port" --ray-client-server-port="$(free_port)" \
    > "$state/head.log" 2>&1 < /dev/null &
  echo $! > "$state/head.pid"
  wait_for 120 "the head's job server coming up" dashboard_up || { down; return 1; }
  # a job goes to the head's agent, and the job server waits only 10 s for one ("No available agent to submit
  # job"): on a busy machine the agent comes up later than the job server
  wait_for 120 "the head's job agent coming up" listening "$head_agent_port" || { down; return 1; }
  for i in $(seq 1 "$WORKERS"); do
    setsid "$PYTHON" -c "$keep_loopback" start --block --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 \
      --node-name="local-worker-$i" --num-cpus="$WORKER_CPUS" --num-gpus="$WORKER_GPUS" \
      --dashboard-agent-listen-port="$(free_port)" --temp-dir="$ray_tmp/worker-$i" \
      > "$state/worker-$i.log" 2>&1 < /dev/null &
    echo $! > "$state/worker-$i.pid"
  done
  wait_for 120 "$WORKERS worker nodes joining" nodes_alive $(( WORKERS + 1 )) || { down; return 1; }
  say "local Ray cluster up: head 127.0.0.1:$GCS_PORT (dashboard http://127.0.0.1:$DASHBOARD_PORT, metrics" \
      "http://127.0.0.1:$METRICS_PORT/metrics), $WORKERS worker nodes x $WORKER_CPUS CPU, $WORKER_GPUS GPU; token auth" \
      "on (token in $state/auth_token). Submit a run with:"
  submit_line
  say "Stop it with: $here/cluster/local.sh down"
}

down() {
  local stopped=0 f pid
  for f in "$state"/worker-*.pid "$state/head.pid"; do  # workers first: the head outlives its nodes
    [ -f "$f" ] || continue
    if alive "$f"; then
      pid="$(cat "$f")"
      kill -TERM "$pid"  # `ray start --block` ends the processes it started, then exits
      for _ in $(seq 1 "$STOP_SECONDS"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      # Still there: kill its whole session (`up` started each node as a session of its own with setsid), the
      # raylet, GCS and workers included, not `ray start` alone.
      if kill -0 "$pid" 2>/dev/null; then
        pkill -KILL -s "$pid" || true
        for _ in $(seq 1 30); do pgrep -s "$pid" >/dev/null || break; sleep 1; done
      fi
      stopped=$(( stopped + 1 ))
    fi
    rm -f "$f"
  done
  say "local Ray cluster down ($stopped node(s) stopped)"
}

status() {
  if ! alive "$state/head.pid"; then say "local Ray cluster is not running (state in $state)"; return 1; fi
  "$RAY" list nodes --address "http://127.0.0.1:$DASHBOARD_PORT"
}

case "${1:-}" in
  up) find_ray; up ;;
  down) down ;;
  status) find_ray; status ;;
  *) say "usage: cluster/local.sh up|status|down" >&2; exit 2 ;;
esac
