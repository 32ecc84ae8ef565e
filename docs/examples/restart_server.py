"""Set-up (not shown): submit slow tasks, then kill their server as a crash would."""

import os
import signal
import socket
import sys
import time

import sheepdog
from sheepdog.server_for import server_for

conf = sheepdog.Config.from_file("cluster.json")


def slow(x):
    import time

    time.sleep(2)
    return x + 1


request_id = sheepdog.map_async(slow, range(4), conf.replace(workers=1))
server = server_for(conf)
port = server.port
with sheepdog.Storage(conf.dbfile) as watch:
    deadline = time.monotonic() + 120
    while watch.count_results(request_id) == 0:  # the worker is running, tasks are pending
        assert time.monotonic() < deadline, "the array task never started"
        time.sleep(0.2)
os.killpg(server.pid, signal.SIGKILL)  # the server dies, as after a crash
for _ in range(100):  # SIGKILL is asynchronous: wait (bounded) until the port is free again
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
            break
        except OSError:
            time.sleep(0.1)
sys.argv[1:] = [str(request_id)]

# --8<-- [example]
import sys
import time

import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started
request_id = int(sys.argv[1])
storage = sheepdog.Storage(conf.dbfile)
# The port the job file names, where the workers look for their server:
port = storage.latest_job(request_id).port
server = sheepdog.Server(port, None, conf.dbfile)
deadline = time.monotonic() + 300  # never wait forever: the job may have died
n_tasks = storage.count_tasks(request_id)
while storage.count_results_and_errors(request_id) < n_tasks:
    print(storage.count_results(request_id), "results", flush=True)
    assert time.monotonic() < deadline, "no results for 5 minutes; job queued?"
    time.sleep(1)
print(sheepdog.get_results(request_id, conf.dbfile))
server.stop()
# prints: [(0, 1), (1, 2), (2, 3), (3, 4)]
