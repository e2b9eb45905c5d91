#!/usr/bin/env bash
# Start or stop one local Ray worker node (an "instance" of infra/local).
#
#   node.sh start   env: NODE_NAME NODE_ID NODE_DIR PID_FILE HEAD_ADDRESS RAY_BIN
#                        NODE_CPUS NODE_MEMORY_MB OBJECT_STORE_MB NODE_TAGS
#                        START_TIMEOUT_S FAIL_APPLY CAPACITY_FILE BOOT_HOLD_FILE
#   node.sh stop    env: PID_FILE STOP_TIMEOUT_S
#
# Starts are serialized on this host (flock): Ray picks each node's free
# ports before its raylet binds them, so nodes starting side by side can pick
# the same port and one raylet dies with "bind: Address already in use".
# A start returns once the node reports "Ray runtime started" (it has joined
# the head), or fails with the end of its log.
#
# The node is `ray start --block` in a session of its own (setsid): the
# session id is the leader's pid, and every Ray process of the node (raylet,
# agents, workers) keeps it. PID_FILE holds the leader's pid and start time;
# stop signals only processes of that session started no earlier than the
# leader, and nothing if a live leader has another start time (a recycled
# pid). Liveness comes from /proc/PID/stat, because killed processes can
# linger as zombies until their parent reaps them.
#
# Each node instance has its own Ray temp dir (/tmp: Unix socket paths must
# stay short). Nodes sharing one would share a logs folder, and every node's
# log monitor would stream every worker's output to the driver: each line
# printed once per node. Stop removes it.
set -euo pipefail

die() { echo "node.sh: $*" >&2; exit 1; }

# proc_field PID N: field N of /proc/PID/stat counted after the "(comm)" part
# (N=1 is the state, 4 the session id). Fails if the process is gone.
proc_field() {
    local n=$2 stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    # shellcheck disable=SC2086
    set -- ${stat##*) }
    [ "$#" -ge "$n" ] || return 1
    echo "${!n}"
}

alive() {
    local state
    state=$(proc_field "$1" 1) || return 1
    [ "$state" != Z ] && [ "$state" != X ]
}

# Live processes of the session led by pid $1 that started at $2 (see above).
node_pids() {
    local sid=$1 leader_start=$2 dir stat pid found=""
    for dir in /proc/[0-9]*; do
        read -r stat 2>/dev/null <"$dir/stat" || continue
        # shellcheck disable=SC2086
        set -- ${stat##*) }
        [ "${4:-}" = "$sid" ] || continue
        case $1 in Z | X) continue ;; esac
        pid=${dir#/proc/}
        if [ "$pid" = "$sid" ] && [ "${20}" != "$leader_start" ]; then
            return 0 # the id belongs to another session now
        fi
        [ "${20}" -ge "$leader_start" ] && found="$found $pid"
    done
    echo $found
}

# PID_FILE: line 1 the leader's pid, line 2 its start time, line 3 its Ray temp dir.
read_pid_file() {
    recorded_temp_dir=""
    { read -r sid && read -r leader_start && { read -r recorded_temp_dir || true; }; } <"$PID_FILE" 2>/dev/null
}

# A failed create leaves the resource tainted, and Terraform never runs the
# destroy provisioner of a tainted resource: clean up here or leak the node.
abort_start() {
    echo "node.sh: $*" >&2
    STOP_TIMEOUT_S=5 stop >&2 || true
    exit 1
}

start() {
    : "${NODE_NAME:?}" "${NODE_ID:?}" "${NODE_DIR:?}" "${PID_FILE:?}" "${HEAD_ADDRESS:?}" "${RAY_BIN:?}"
    if [ "${FAIL_APPLY:-0}" = 1 ]; then
        die "InsufficientInstanceCapacity: no capacity for node $NODE_NAME on this host (simulated: fail_apply = true)"
    fi
    if [ -n "${CAPACITY_FILE:-}" ] && [ -e "$CAPACITY_FILE" ]; then
        die "InsufficientInstanceCapacity: no capacity for node $NODE_NAME on this host (simulated: $CAPACITY_FILE exists)"
    fi
    local held=0
    while [ -n "${BOOT_HOLD_FILE:-}" ] && [ -e "$BOOT_HOLD_FILE" ]; do
        [ "$held" -lt "${START_TIMEOUT_S:-120}" ] \
            || die "node $NODE_NAME still held by $BOOT_HOLD_FILE after ${START_TIMEOUT_S:-120}s"
        sleep 1
        held=$((held + 1))
    done
    [ -x "$RAY_BIN" ] || die "ray CLI not found or not executable at $RAY_BIN (variable ray_bin)"
    mkdir -p "$NODE_DIR"
    local log="$NODE_DIR/ray.log" tags=${NODE_TAGS:-"{}"} pid sid leader_start recorded_temp_dir
    local temp_dir="/tmp/dbrx-ray-$(id -u)-node-${NODE_ID:0:12}"
    if read_pid_file && [ -n "$(node_pids "$sid" "$leader_start")" ]; then
        echo "node $NODE_NAME already running (pid $sid)"
        return 0
    fi
    exec 9>"$(dirname "$NODE_DIR")/.start.lock"
    flock 9
    # Ray workers inherit the raylet's environment: DBRX_NODE_* reach the
    # training worker (DBRX_NODE_DIR is the spot-notice contract's directory).
    export DBRX_NODE_NAME="$NODE_NAME" DBRX_NODE_ID="$NODE_ID" DBRX_NODE_DIR="$NODE_DIR"
    setsid nohup "$RAY_BIN" start --address "$HEAD_ADDRESS" --block \
        --num-cpus "$NODE_CPUS" --num-gpus 0 \
        --memory $((NODE_MEMORY_MB * 1024 * 1024)) \
        --object-store-memory $((OBJECT_STORE_MB * 1024 * 1024)) \
        --resources "{\"node_slot\": 1, \"node_$NODE_NAME\": 1}" \
        --labels "dbrx-platform/node=$NODE_NAME,dbrx-platform/instance=$NODE_ID" \
        --node-name "$NODE_NAME" --temp-dir "$temp_dir" --disable-usage-stats \
        >"$log" 2>&1 </dev/null 9>&- &
    pid=$!
    # setsid runs in the background child: give it a moment to take effect.
    local tries=0
    until [ "$(proc_field "$pid" 4 || true)" = "$pid" ]; do
        tries=$((tries + 1))
        if [ "$tries" -ge 50 ]; then
            kill -KILL "$pid" 2>/dev/null || true
            die "node $NODE_NAME: pid $pid did not become a session leader"
        fi
        sleep 0.1
    done
    printf '%s\n%s\n%s\n' "$pid" "$(proc_field "$pid" 20)" "$temp_dir" >"$PID_FILE"
    printf '{"name": "%s", "id": "%s", "pid": %s, "head_address": "%s", "tags": %s}\n' \
        "$NODE_NAME" "$NODE_ID" "$pid" "$HEAD_ADDRESS" "$tags" >"$NODE_DIR/node.json"
    local deadline=$((SECONDS + ${START_TIMEOUT_S:-120}))
    until grep -q "Ray runtime started" "$log"; do
        if ! alive "$pid"; then
            tail -n 20 "$log" >&2
            abort_start "node $NODE_NAME exited at start; the lines above are the end of $log"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$log" >&2
            abort_start "node $NODE_NAME did not join $HEAD_ADDRESS within ${START_TIMEOUT_S:-120}s (see $log)"
        fi
        sleep 0.5
    done
    flock -u 9
    echo "node $NODE_NAME joined $HEAD_ADDRESS (pid $pid, log $log)"
}

stop() {
    : "${PID_FILE:?}"
    local timeout=${STOP_TIMEOUT_S:-15} sid leader_start recorded_temp_dir pids
    if ! read_pid_file; then
        echo "no pid file $PID_FILE: node already stopped"
        return 0
    fi
    pids=$(node_pids "$sid" "$leader_start")
    # The leader (`ray start --block`) first: it stops the raylet before the
    # agents, so the node leaves without "an agent failed" errors on the driver.
    # What is left after half the timeout is signalled too, then killed.
    if [ -n "$pids" ]; then
        kill -TERM "$sid" 2>/dev/null || true
        wait_gone "$((timeout * 5))" || true
    fi
    if pids=$(node_pids "$sid" "$leader_start") && [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        wait_gone "$((timeout * 5))" || true
    fi
    if pids=$(node_pids "$sid" "$leader_start") && [ -n "$pids" ]; then
        echo "node session $sid still running after ${timeout}s: SIGKILL $pids" >&2
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
    fi
    case $recorded_temp_dir in /tmp/dbrx-ray-*-node-?*) rm -rf "$recorded_temp_dir" ;; esac
    rm -f "$PID_FILE"
    echo "node session $sid stopped"
}

# wait_gone TENTHS: until no process of the session is left, or TENTHS/10 s.
wait_gone() {
    local waited=0
    while [ -n "$(node_pids "$sid" "$leader_start")" ]; do
        [ "$waited" -lt "$1" ] || return 1
        sleep 0.1
        waited=$((waited + 1))
    done
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*) die "usage: node.sh start|stop" ;;
esac
