# %postun of the baton rpm. $1: 0 after erase, 1 after an upgrade (run by the
# old package once the new files are in place).
# Upgrade: %systemd_postun without the restart: daemon-reload, then, if
# baton-httpd.service runs, upgrade its Baton in place (`baton upgrade`: same
# MainPID, sockets, fd store and generations) and reload it (a new generation
# of the new baton-httpd); only a Baton that cannot take the upgrade is
# restarted (try-restart), with the reason logged. Never baton-httpd.socket
# or baton-httpd-b.socket: the socket units hold the listeners, and
# restarting one would refuse connections. This runs from the old package once the new files are in, so
# an upgrade from a package older than this logic restarts the service once.
# The template is packaging/rpm/postun.sh; packaging/build.sh inserts
# packaging/upgrade-service.sh at the marker below.

#BATON_UPGRADE_SERVICE#

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        baton_upgrade_service systemctl try-restart baton-httpd.service
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
