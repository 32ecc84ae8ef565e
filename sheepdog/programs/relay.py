"""The tunnel's relay on the head node: it pipes each connection to the forwarded port.

Run on the head node as ``python3 -c TEXT BIND PORT TARGET_PORT MAX_CONNECTIONS IDLE_S
[TARGET_HOST]`` (sheepdog.tunnel). Python 3.6+, standard library only, one thread: a
selector pipes every connection to TARGET_HOST:TARGET_PORT (by default 127.0.0.1: the
forwarded port). Over OpenSSH, sheepdog also runs it on the user's machine, between the
forward and the server, to bound the forwarded port's connections the same way. BIND ""
means the first address other than loopback that the head node's name resolves to (where
the execution nodes reach it; "0.0.0.0" only if there is none). It prints ``hostname port
bound-address`` once it listens; beyond MAX_CONNECTIONS, a new connection closes the one
idle longest if that was idle 5 s, else it is closed at once; connections idle for IDLE_S
are closed; a line ``allow N`` on stdin sets MAX_CONNECTIONS to N. It exits at EOF on
stdin, which comes when sheepdog's SSH channel (or connection) closes.
"""
import errno
import os
import selectors
import socket
import sys
import time

MYPY = False
if MYPY:  # type checkers only
    from typing import List, Set  # noqa: F401 - named in type comments

BUFFER = 262144  # bytes held per direction; reading stops beyond it
EVICT_IDLE_S = 5.0  # when full, a connection idle this long makes room for a new one
R, W = selectors.EVENT_READ, selectors.EVENT_WRITE

#: MAX_CONNECTIONS (a list: ``allow N`` on stdin changes it), TARGET_PORT and IDLE_S,
#: from the command line (main).
cap = [0]  # type: List[int]
target_host = "127.0.0.1"
target_port = 0
idle_s = 0.0


def where():
    # type: () -> str
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        infos = []
    for info in infos:
        if not str(info[4][0]).startswith("127."):
            return str(info[4][0])
    return "0.0.0.0"  # noqa: S104 - no other address: every interface, as documented


class Side(object):
    def __init__(self, sock):
        # type: (socket.socket) -> None
        self.sock, self.out, self.eof, self.shut, self.events = sock, bytearray(), False, False, 0


class Pair(object):
    def __init__(self, a, b):
        # type: (socket.socket, socket.socket) -> None
        self.sides, self.seen, self.closed = (Side(a), Side(b)), time.time(), False


pairs = set()  # type: Set[Pair]
sel = selectors.DefaultSelector()


def close(pair):
    # type: (Pair) -> None
    pair.closed = True
    pairs.discard(pair)
    for side in pair.sides:
        if side.events:
            sel.unregister(side.sock)
        side.sock.close()


def update(pair):
    # type: (Pair) -> None
    if pair.closed:
        return
    a, b = pair.sides
    for side, peer in ((a, b), (b, a)):
        if side.eof and not peer.out and not peer.shut:
            try:
                peer.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            peer.shut = True
    if a.eof and b.eof and not a.out and not b.out:
        close(pair)
        return
    for side, peer in ((a, b), (b, a)):
        events = (R if not side.eof and len(peer.out) < BUFFER else 0) | (W if side.out else 0)
        if events != side.events:
            if not side.events:
                sel.register(side.sock, events, (pair, side, peer))
            elif not events:
                sel.unregister(side.sock)
            else:
                sel.modify(side.sock, events, (pair, side, peer))
            side.events = events


def step(pair, side, peer, events):
    # type: (Pair, Side, Side, int) -> None
    pair.seen = time.time()
    try:
        if events & W:
            del side.out[:side.sock.send(side.out)]
        if events & R:
            data = side.sock.recv(65536)
            if data:
                peer.out += data
            else:
                side.eof = True
    except (BlockingIOError, InterruptedError):
        pass


def accept(listener):
    # type: (socket.socket) -> None
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # e.g. out of file descriptors: the connection waits in the queue
        if len(pairs) >= cap[0]:
            # Full: make room by closing the connection idle longest, if it has been idle a
            # while (a stranger's held connection, or a worker's between calls: it
            # reconnects); else refuse this one.
            oldest = min(pairs, key=lambda p: p.seen)
            if time.time() - oldest.seen < EVICT_IDLE_S:
                conn.close()
                continue
            close(oldest)
        conn.setblocking(False)
        # An answer often comes as two writes (headers, body): without TCP_NODELAY the
        # second waits for the peer's delayed ACK, 40 ms (docs/benchmarks.rst).
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = socket.socket(socket.AF_INET6 if ":" in target_host else socket.AF_INET,
                           socket.SOCK_STREAM)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up.setblocking(False)
        err = up.connect_ex((target_host, target_port))
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sys.stderr.write("sheepdog relay: cannot reach %s:%d: %s\n"
                             % (target_host, target_port, os.strerror(err)))
            conn.close()
            up.close()
            continue
        pair = Pair(conn, up)
        pairs.add(pair)
        update(pair)


def main():
    # type: () -> None
    global target_host, target_port, idle_s
    bind, port, target_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cap[0], idle_s = int(sys.argv[4]), float(sys.argv[5])
    if len(sys.argv) > 6:
        target_host = sys.argv[6]
    address = bind or where()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(128)
    listener.setblocking(False)
    sys.stdout.write("%s %d %s\n" % (socket.gethostname(), listener.getsockname()[1], address))
    sys.stdout.flush()
    sel.register(listener, R, None)
    sel.register(0, R, "stdin")
    control = b""
    while True:
        for key, events in sel.select(1.0):
            if key.data is None:
                accept(listener)
            elif key.data == "stdin":
                data = os.read(0, 65536)
                if not data:
                    os._exit(0)
                control += data
                while b"\n" in control:
                    line, control = control.split(b"\n", 1)
                    words = line.split()
                    if len(words) == 2 and words[0] == b"allow" and words[1].isdigit():
                        cap[0] = int(words[1])
            else:
                pair, side, peer = key.data
                if pair.closed:
                    continue
                try:
                    step(pair, side, peer, events)
                except OSError:
                    close(pair)
                    continue
                update(pair)
        now = time.time()
        for pair in [p for p in pairs if now - p.seen > idle_s]:
            close(pair)


if __name__ == "__main__":
    main()
