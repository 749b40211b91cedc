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
#   METRICS_PORT (8276, the head's Prometheus endpoint), RAY (default: this project's .venv/bin/ray, else ray).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${PRISM_LOCAL_CLUSTER:-/tmp/prism-ray-local-${USER:-$(id -un)}}"
WORKERS="${WORKERS:-2}" WORKER_CPUS="${WORKER_CPUS:-1}" WORKER_GPUS="${WORKER_GPUS:-0}"
GCS_PORT="${GCS_PORT:-6390}" DASHBOARD_PORT="${DASHBOARD_PORT:-8275}" METRICS_PORT="${METRICS_PORT:-8276}"
if [ -z "${RAY:-}" ]; then
  if [ -x "$here/.venv/bin/ray" ]; then RAY="$here/.venv/bin/ray"; else RAY="$(command -v ray)"; fi
fi
PYTHON="$(head -n 1 "$RAY" | sed 's/^#! *//')"  # the interpreter of this ray (a console script)
# Ray's session sockets must fit in 107 bytes: keep its temp folders short, one per state folder, and one per
# node (nodes of one host sharing a temp folder collide on the object store's socket).
ray_tmp="/tmp/prism-ray-local-$(printf %s "$state" | cksum | cut -d ' ' -f 1)"

export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/auth_token"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
# SIGTERM to `ray start --block` drains the node for 30 s by default before stopping it: `down` is for now.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

# `ray start --address=127.0.0.1:PORT` swaps 127.0.0.1 for the machine's interface address, where a head bound
# to loopback does not listen (and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which stops the swap, also refuses
# worker nodes): worker nodes run Ray's own CLI with that one function keeping the address as given.
keep_loopback='import sys, ray._private.services as s
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
  # The head binds to loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 as its address. Ports
  # with fixed defaults (agent 52365, client 10001) are picked free: another Ray on this machine may hold them.
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 setsid "$RAY" start --head --block --node-ip-address=127.0.0.1 \
    --node-name=local-head --port="$GCS_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --metrics-export-port="$METRICS_PORT" --num-cpus=0 --num-gpus=0 --temp-dir="$ray_tmp/head" \
    --dashboard-agent-listen-port="$(free_port)" --ray-client-server-port="$(free_port)" \
    > "$state/head.log" 2>&1 < /dev/null &
  echo $! > "$state/head.pid"
  wait_for 120 "the head's job server coming up" dashboard_up || { down; return 1; }
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
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
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
  up) up ;;
  down) down ;;
  status) status ;;
  *) say "usage: cluster/local.sh up|status|down" >&2; exit 2 ;;
esac
