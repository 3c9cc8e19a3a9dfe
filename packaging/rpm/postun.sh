# %postun of the baton rpm. $1: 0 after erase, 1 after an upgrade (run by the
# old package once the new files are in place).
# Upgrade: restart baton-httpd.service if it runs, and never baton-httpd.socket:
# the socket unit holds the listener, and restarting it would refuse
# connections. The old Baton drains (idle keep-alive connections go through
# the fd store) and the new one starts on the same listener.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart baton-httpd.service >/dev/null 2>&1 || :
    fi
fi
# Erase: cargo-generate-rpm 0.21 cannot list directories in the package (its
# `dir = true` assets fail to build), so rpm does not own, and would leave,
# the package's own directories; remove them when empty.
if [ "$1" -eq 0 ]; then
    rmdir /usr/share/baton-httpd/www /usr/share/baton-httpd /usr/share/doc/baton \
        /usr/share/licenses/baton >/dev/null 2>&1 || :
fi
exit 0
