#!/bin/sh
# Stop the process start.sh started, waiting up to 10 s for it to exit.
set -eu
pidfile="$SVCREG_SHARED_DIR/hello.pid"
[ -f "$pidfile" ] || exit 0
pid=$(cat "$pidfile")
if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
fi
rm -f "$pidfile"
echo "stopped hello (pid $pid)"
