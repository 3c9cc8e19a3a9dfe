# %preun of the baton rpm. $1: 0 on erase, 1 on upgrade (then nothing stops).
# Erase: disable, then stop the service (it drains while the listener still
# exists) and only then the sockets.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable baton-httpd.service baton-httpd.socket baton-httpd-b.socket >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl stop baton-httpd.service >/dev/null 2>&1 || :
        systemctl stop baton-httpd.socket baton-httpd-b.socket >/dev/null 2>&1 || :
    fi
fi
exit 0
