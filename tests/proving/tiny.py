# The python3 app of tests/proving.rs (see TINY_PY there for its flags).
import os, selectors, signal, socket, sys, threading
args = sys.argv[1:]
code = int(args[args.index("--status") + 1]) if "--status" in args else 200
def notify(msg):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect(addr)
    s.send(msg.encode())
    s.close()
n = int(os.environ.get("LISTEN_FDS", "0")) if os.environ.get("LISTEN_PID") == str(os.getpid()) else 0
listeners = [socket.socket(fileno=3 + i) for i in range(n)]
names = os.environ.get("LISTEN_FDNAMES", "").split(":")
real = [i >= len(names) or names[i] != "probe" for i in range(n)]
triggered = []
def serve(c, real):
    try:
        c.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = c.recv(4096)
            if not chunk:
                return
            head += chunk
        # A real request (not a probe, nor an empty connection such as
        # Baton's steering calibration leaves for the first generation).
        if real and "--die-on-traffic" in args:
            os._exit(1)
        if real and "--trigger-on-traffic" in args and not triggered:
            triggered.append(True)
            notify("WATCHDOG=trigger")
        body = b"tiny\n"
        c.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nbaton-pid: %d\r\nConnection: close\r\n\r\n%s"
                  % (code, len(body), os.getpid(), body))
    except OSError:
        pass
    finally:
        c.close()
r, w = os.pipe()
os.set_blocking(w, False)
signal.set_wakeup_fd(w)
signal.signal(signal.SIGTERM, lambda *a: None)
sel = selectors.DefaultSelector()
sel.register(r, selectors.EVENT_READ, None)
if "--no-accept" not in args:
    for l in listeners:
        if "--probe-only" in args and real[listeners.index(l)]:
            continue
        l.setblocking(False)
        sel.register(l, selectors.EVENT_READ, (l, real[listeners.index(l)]))
if "--notify" in args:
    notify("READY=1")
threads = []
while True:
    events = sel.select()
    if any(key.data is None for key, _ in events):
        break
    for key, _ in events:
        try:
            c, _ = key.data[0].accept()
        except (BlockingIOError, InterruptedError):
            continue
        c.setblocking(True)
        t = threading.Thread(target=serve, args=(c, key.data[1]))
        t.start()
        threads = [x for x in threads if x.is_alive()] + [t]
for l in listeners:
    l.close()
for t in threads:
    t.join()
