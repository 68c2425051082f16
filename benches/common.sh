# Shared by compare.sh and ab.sh (sourced, not run).

# Processes started in the background, killed on exit.
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# $1: placement ("default" or "pinned"); prints the command prefix.
prefix() { if [ "$1" = pinned ]; then echo "taskset -c 0"; fi; }

# Waits until something listens on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    return 1
}
