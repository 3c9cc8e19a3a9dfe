# %post of the baton rpm. $1: 1 on install, 2 on upgrade.
# Install: enable the units as the presets say (this package's
# 50-baton.preset enables all three; a local preset can disable them) and
# start what is enabled, the sockets first. Upgrade: the old package's
# %postun upgrades Baton in place and reloads the service (never a socket)
# once the new files are in; here only baton-httpd-b.socket, the steering
# sibling of baton-httpd.socket, new to an upgrade from a package without
# it: enabled as the presets say when its twin is enabled, and started only
# when the service is not running (baton_start_sibling says why).
# The template is packaging/rpm/post.sh; packaging/build.sh inserts
# packaging/upgrade-service.sh at the marker below.

#BATON_UPGRADE_SERVICE#

if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset baton-httpd.socket baton-httpd-b.socket baton-httpd.service >/dev/null 2>&1 || :
    # Not in a chroot or image build without systemd running.
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || :
        for unit in baton-httpd.socket baton-httpd-b.socket baton-httpd.service; do
            if systemctl -q is-enabled "$unit" 2>/dev/null; then
                systemctl start "$unit" >/dev/null 2>&1 || :
            fi
        done
    fi
elif [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    # Disabling the sibling alone changes nothing (the service's Requires=
    # starts it), so the preset may apply again at every upgrade.
    if systemctl -q is-enabled baton-httpd.socket 2>/dev/null &&
        ! systemctl -q is-enabled baton-httpd-b.socket 2>/dev/null; then
        systemctl --no-reload preset baton-httpd-b.socket >/dev/null 2>&1 || :
    fi
    if systemctl -q is-enabled baton-httpd-b.socket 2>/dev/null; then
        baton_start_sibling systemctl start
    fi
fi
exit 0
