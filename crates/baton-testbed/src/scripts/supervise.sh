# baton-testbed supervisor: runs on the host, in the caller's namespaces.
#
# stdin  - keep-alive pipe; the Testbed never writes to it. EOF means the
#          Testbed was dropped OR the whole test process died (even by
#          SIGKILL), and in both cases we must tear the namespace down.
# stdout - report pipe; handed to stage 2 as fd 3, our own copy is closed.
#
# Environment: BT_STATE (state dir), BT_CGROUP (our cgroup dir), BT_STAGE2
# (path of stage2.sh), and what stage 2 reads.
set -u
[ -n "$BT_STATE" ] && [ -n "$BT_CGROUP" ] && [ -n "$BT_STAGE2" ] || exit 2

# The payload must sit in its own cgroup when `unshare --cgroup` runs, so that
# cgroup becomes the root of the new cgroup namespace (systemd's "/").
# --kill-child makes the kernel SIGKILL the namespace's PID 1 when unshare
# dies (PR_SET_PDEATHSIG), which kills the whole pid namespace.
sh -c 'echo $$ >"$BT_CGROUP/payload/cgroup.procs" &&
       exec unshare --pid --mount --uts --ipc --cgroup --fork --kill-child \
            --propagation private -- sh "$BT_STAGE2"' \
    3>&1 >>"$BT_STATE/pid1.log" 2>&1 &
unshare_pid=$!
exec >>"$BT_STATE/supervisor.log" 2>&1

read -r _ || true

kill -KILL "$unshare_pid" 2>/dev/null
wait "$unshare_pid"

# PID 1 gets its SIGKILL asynchronously (parent-death signal); wait until the
# cgroup is empty, then remove it bottom-up. Bounded: 20 s.
i=0
while [ -d "$BT_CGROUP" ] && [ $i -lt 200 ]; do
    find "$BT_CGROUP" -depth -type d -exec rmdir {} + 2>/dev/null
    [ -d "$BT_CGROUP" ] || break
    sleep 0.1
    i=$((i + 1))
done
[ -d "$BT_CGROUP" ] && echo "baton-testbed: could not remove cgroup $BT_CGROUP" >&2

# The host mount namespace has no mounts below BT_STATE (they all lived in the
# private namespace); --one-file-system makes sure rm never crosses one anyway.
case $BT_STATE in
/?*/*) rm -rf --one-file-system "$BT_STATE" ;;
*) echo "baton-testbed: refusing to remove state dir '$BT_STATE'" >&2 ;;
esac
