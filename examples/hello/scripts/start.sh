#!/bin/sh
# Start bin/hello in the background; its pid goes to the shared folder so stop.sh finds it.
set -eu
pidfile="$SVCREG_SHARED_DIR/hello.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "hello is already running (pid $(cat "$pidfile"))"
    exit 0
fi
nohup "$SVCREG_RELEASE_DIR/bin/hello" >>"$SVCREG_SHARED_DIR/hello.log" 2>&1 </dev/null &
echo $! >"$pidfile"
echo "started hello $SVCREG_VERSION (pid $!)"
