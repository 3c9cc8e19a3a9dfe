# ---- baton_upgrade_service: from packaging/upgrade-service.sh --------------
# packaging/build.sh inserts this file where a maintainer script has the line
# `#BATON_UPGRADE_SERVICE#` (the .deb's postinst, the .rpm's %postun), so both
# packages upgrade the running service the same way. POSIX sh; safe under
# `set -e`.
#
# A package upgrade never restarts Baton when it can take the upgrade (nor
# starts a socket unit the running service could not take: see
# baton_start_sibling below):
#  1. `baton upgrade`: the running Baton re-executes the new /usr/bin/baton in
#     the same process (systemd's MainPID, the listeners, the fd store and the
#     generations all stay);
#  2. `systemctl reload`: a new generation of the new /usr/bin/baton-httpd
#     starts, and the old one drains, handing its idle keep-alive connections
#     over.
# Only when the running Baton cannot take the upgrade (no Baton answers on
# its control socket, it is too old to know `baton upgrade`, or it refuses
# the new binary: any non-zero exit) is the service restarted instead, with
# the reason on the terminal and in the journal (`journalctl -t
# baton-package`, and `journalctl -u baton-httpd.service`). No SysV init
# script, update-rc.d or invoke-rc.d is involved anywhere.

BATON_SERVICE=baton-httpd.service
# The steering sibling of baton-httpd.socket (the second socket of port 80,
# ReusePort=yes in both units): see baton_start_sibling.
BATON_SIBLING=baton-httpd-b.socket
BATON_CONTROL=/run/baton-httpd/baton-httpd.sock
BATON_LOG_TAG=baton-package

# baton_log PRIORITY MESSAGE: PRIORITY is a syslog level number (3 err,
# 4 warning, 5 notice). To the terminal, and to the journal attached to the
# service (OBJECT_SYSTEMD_UNIT=, which `journalctl -u` shows for root's
# messages), else to syslog, else with systemd-cat.
baton_log() {
	baton_msg=$(printf '%s' "$2" | tr '\n' ' ')
	echo "baton: $baton_msg" >&2
	if command -v logger >/dev/null 2>&1; then
		printf 'MESSAGE=%s\nSYSLOG_IDENTIFIER=%s\nPRIORITY=%s\nOBJECT_SYSTEMD_UNIT=%s\n' \
			"$baton_msg" "$BATON_LOG_TAG" "$1" "$BATON_SERVICE" | logger --journald 2>/dev/null ||
			logger -t "$BATON_LOG_TAG" -p "daemon.$1" -- "$baton_msg" 2>/dev/null || :
	elif command -v systemd-cat >/dev/null 2>&1; then
		printf '%s\n' "$baton_msg" | systemd-cat -t "$BATON_LOG_TAG" -p "$1" 2>/dev/null || :
	fi
}

# baton_upgrade_service FALLBACK...: upgrade the running service in place;
# FALLBACK (a command) restarts it when that is impossible, and is also what
# runs when the service is not running (deb-systemd-invoke restart starts an
# enabled unit; systemctl try-restart does nothing).
baton_upgrade_service() {
	if ! systemctl --quiet is-active "$BATON_SERVICE" 2>/dev/null; then
		"$@" >/dev/null 2>&1 || :
		return 0
	fi
	# A policy-rc.d that forbids restarting (container images) forbids
	# touching the running service at all; FALLBACK honours it too.
	# (/usr/sbin/policy-rc.d, found on the scripts' PATH, as lintian wants.)
	if command -v policy-rc.d >/dev/null 2>&1; then
		baton_rc=0
		policy-rc.d "$BATON_SERVICE" restart >/dev/null 2>&1 || baton_rc=$?
		if [ "$baton_rc" -eq 101 ]; then
			"$@" >/dev/null 2>&1 || :
			return 0
		fi
	fi
	baton_rc=0
	baton_out=$(timeout 120 /usr/bin/baton upgrade --name baton-httpd --control "$BATON_CONTROL" \
		--binary /usr/bin/baton 2>&1) || baton_rc=$?
	if [ "$baton_rc" -ne 0 ]; then
		baton_log 4 "$BATON_SERVICE: the running Baton cannot take the upgrade (baton upgrade exited $baton_rc: ${baton_out:-no output}); restarting $BATON_SERVICE instead"
		"$@" >/dev/null 2>&1 || baton_log 3 "$BATON_SERVICE: the restart failed too: see systemctl status $BATON_SERVICE"
		return 0
	fi
	baton_log 5 "$BATON_SERVICE: $baton_out"
	# A new generation of the new app binary. Should it fail to become
	# ready, the previous generation keeps serving: a restart would only
	# replace it with one that failed, so report and leave it.
	baton_rc=0
	baton_out=$(systemctl reload "$BATON_SERVICE" 2>&1) || baton_rc=$?
	if [ "$baton_rc" -ne 0 ]; then
		baton_log 3 "$BATON_SERVICE: Baton was upgraded in place, but systemctl reload failed (exit $baton_rc: ${baton_out:-no output}); the previous generation keeps serving: see systemctl status $BATON_SERVICE, then run systemctl reload $BATON_SERVICE"
		return 0
	fi
	baton_log 5 "$BATON_SERVICE: reloaded: a new generation of /usr/bin/baton-httpd serves"
}
# baton_start_sibling START...: starts $BATON_SIBLING with START (a command
# taking the unit: `deb-systemd-invoke start`, `systemctl start`) unless the
# service runs already. systemd passes a socket unit's fds to the service at
# its start only, so a Baton running since before $BATON_SIBLING existed (an
# upgrade from a package without it) cannot get it; and once that socket
# listened, the kernel would give it about half of the new connections (its
# SO_REUSEPORT group has no steering program: Baton attaches one only to a
# pair it holds), where, with the service already running, systemd no longer
# looks at it and nobody accepts them: measured 21 of 40 connections stuck.
# So it is left stopped, and Baton shares the one socket between its
# generations, unsteered (as `baton status` and its log say), every
# connection served. Nor can the service's next start take it (its Wants=
# starts it first): the old baton-httpd.socket's listener was bound before
# its unit said ReusePort=yes, so the sibling cannot join it (EADDRINUSE)
# and the service starts without it, unsteered still. Steering begins at the
# next boot, or once the administrator stops $BATON_SERVICE and both socket
# units and starts them again (stopped first: the old listener must be gone
# before the sibling binds), which closes the listener once (connections
# are refused meanwhile): the administrator's choice, never the package's.
baton_start_sibling() {
	baton_state=$(systemctl show --property=ActiveState --value "$BATON_SERVICE" 2>/dev/null) || baton_state=""
	case "$baton_state" in
	"" | inactive | failed)
		"$@" "$BATON_SIBLING" >/dev/null 2>&1 || :
		;;
	*)
		if ! systemctl --quiet is-active "$BATON_SIBLING" 2>/dev/null; then
			baton_log 5 "$BATON_SERVICE: $BATON_SIBLING (new: the second listener of each address, for steering new connections to proven generations only) is left inactive: Baton shares one listener between its generations, unsteered, until the next boot or a fresh start of baton-httpd.socket, $BATON_SIBLING and $BATON_SERVICE together (the running listener lacks SO_REUSEPORT; that start closes it once)"
		fi
		;;
	esac
}
# ---- end of packaging/upgrade-service.sh -------------------------------------
