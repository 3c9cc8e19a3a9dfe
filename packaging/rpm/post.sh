# %post of the baton rpm. $1: 1 on install, 2 on upgrade.
# Install: enable the units as the presets say (this package's
# 50-baton.preset enables both; a local preset can disable them) and start
# what is enabled, the socket first. Upgrade: nothing here; the old package's
# %postun upgrades Baton in place and reloads the service (never the socket)
# once the new files are in.
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset baton-httpd.socket baton-httpd.service >/dev/null 2>&1 || :
    # Not in a chroot or image build without systemd running.
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || :
        for unit in baton-httpd.socket baton-httpd.service; do
            if systemctl -q is-enabled "$unit" 2>/dev/null; then
                systemctl start "$unit" >/dev/null 2>&1 || :
            fi
        done
    fi
fi
exit 0
