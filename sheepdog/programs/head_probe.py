"""Whether the head node can open a TCP connection to HOST PORT within TIMEOUT_S seconds.

Run on the head node as ``python3 -c TEXT HOST PORT TIMEOUT_S`` (sheepdog.tunnel's
``probe_from_head``). Prints ``connected`` and exits 0, or prints the error and exits 3.
Python 3.6+, standard library only.
"""
import socket
import sys

if __name__ == "__main__":
    try:
        address = (sys.argv[1], int(sys.argv[2]))
        socket.create_connection(address, timeout=float(sys.argv[3])).close()
    except Exception as e:  # noqa: BLE001 - any failure is the answer, printed
        print("%s: %s" % (type(e).__name__, e))
        sys.exit(3)
    print("connected")
