# baton-testbed stage 2: PID 1 of the new pid/mount/uts/ipc/cgroup namespaces,
# still seeing the host's root and /proc. Builds the overlay root, pivots into
# it and execs systemd (same pid, so the pid we report is systemd's).
#
# fd 3 - report pipe: we write "<host pid> <host pid of unshare>\n".
# Environment: BT_STATE, BT_LOWER, BT_BINDS (newline-separated absolute dirs),
#              BT_MACHINE_ID, BT_TARGET_UNIT (contents of baton-testbed.target).
set -eu

# /proc is still the host's procfs, so /proc/self/stat holds host pids. `read`
# is a builtin: the shell itself (pid 1 here) opens the file.
read -r host_pid _comm _state host_ppid _rest </proc/self/stat
echo "$host_pid $host_ppid" >&3
exec 3>&-

mount --make-rprivate /

S=$BT_STATE
R=$S/root
mount -t tmpfs -o mode=0755 baton-testbed-layers "$S/layers"
mkdir "$S/layers/upper" "$S/layers/work"
# All writes of systemd and the tests land in the tmpfs upper layer; the
# lower layer (host / or the cached trixie root) is never modified.
mount -t overlay -o "lowerdir=$BT_LOWER,upperdir=$S/layers/upper,workdir=$S/layers/work" \
    baton-testbed "$R"

# API file systems. This procfs belongs to the new pid namespace because we
# are its PID 1. /sys read-only: udevd and friends skip themselves (as in
# systemd-nspawn). cgroup2 shows our payload cgroup as its root.
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"

# A private /dev: never the host's, or systemd-tmpfiles would create static
# device nodes in the real /dev. Only the harmless character devices.
mount -t tmpfs -o mode=0755,nosuid,size=4m baton-testbed-dev "$R/dev"
for n in null zero full random urandom tty; do
    touch "$R/dev/$n"
    mount --bind "/dev/$n" "$R/dev/$n"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
# Whatever systemd writes to its console ends up in a file the host can read.
touch "$R/dev/console" "$S/console.log"
mount --bind "$S/console.log" "$R/dev/console"

# A fresh /tmp: systemd-tmpfiles empties /tmp at boot; with a tmpfs here it
# only ever empties its own.
mount -t tmpfs -o mode=1777,nosuid,nodev baton-testbed-tmp "$R/tmp"

# Directories shared with the host at the same absolute path (cargo target
# dir, scratch dir). Bound, not read through the lower layer: overlayfs does
# not define what happens when a lower layer changes under a mounted overlay.
while IFS= read -r dir; do
    [ -n "$dir" ] || continue
    mkdir -p "$R$dir"
    mount --rbind "$dir" "$R$dir"
done <<BINDS
$BT_BINDS
BINDS

# Per-boot identity and configuration, written into the upper layer only.
printf '%s\n' "$BT_MACHINE_ID" >"$R/etc/machine-id"
echo baton-testbed >"$R/etc/hostname"
printf '%s' "$BT_TARGET_UNIT" >"$R/etc/systemd/system/baton-testbed.target"
# Loading kernel modules is impossible (and pointless) in a container; on 257
# the unit fails and would leave the system `degraded` for no reason.
ln -sf /dev/null "$R/etc/systemd/system/systemd-modules-load.service"

cd "$R"
# pivot_root(".", "."): the old root ends up stacked on top of the new one and
# is detached right away (see pivot_root(2)); no put_old directory needed.
pivot_root . .
umount -l .
cd /

exec env -i container=other PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --unit=baton-testbed.target
