"""A stand-in for OpenSSH's ``ssh`` in unit tests (tests/test_openssh.py); no network.

The "head node" is this machine: a session runs its command with ``sh -c``. The
master connection is the file ``$FAKE_SSH_MASTER``: ``-O check`` and ``-O exit`` look
at it, ``-M -N -f`` makes it, unless ``$FAKE_SSH_REFUSE`` exists (the server refused
the code, or asks for one in BatchMode) or ``known_hosts`` is a file named ``empty``
(the host key is unknown). A session without a master in BatchMode is refused too, as
an MFA host would. With ``$FAKE_SSH_NO_MASTER`` set, ``-M`` logs in but makes no master, as
ssh does when the socket's path is taken. Every command line is appended to
``$FAKE_SSH_LOG`` as JSON.
"""

import json
import os
import subprocess
import sys

args = sys.argv[1:]
with open(os.environ["FAKE_SSH_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
master = os.environ["FAKE_SSH_MASTER"]
refuse = os.path.exists(os.environ["FAKE_SSH_REFUSE"])
DENIED = "sheep@headnode: Permission denied (keyboard-interactive).\n"

if "-G" in args:
    sys.exit(subprocess.call(["/usr/bin/ssh", *args]))
if "-O" in args:
    command = args[args.index("-O") + 1]
    if not os.path.exists(master):
        sys.stderr.write("Control socket connect(x): No such file or directory\n")
        sys.exit(255)
    if command == "check":
        sys.stderr.write("Master running (pid=4321)\r\n")
    elif command == "exit":
        os.unlink(master)
        sys.stderr.write("Exit request sent.\r\n")
    elif command == "forward":
        print(4242)
    sys.exit(0)
if "-M" in args:
    if any(a.startswith("UserKnownHostsFile=") and a.endswith("empty") for a in args):
        sys.stderr.write("No ED25519 host key is known for [headnode]:2222 and you have "
                         "requested strict checking.\r\nHost key verification failed.\r\n")
        sys.exit(255)
    if refuse:
        sys.stderr.write(DENIED)
        sys.exit(255)
    if os.environ.get("FAKE_SSH_NO_MASTER"):  # the socket's path was taken
        sys.stderr.write("ControlSocket x already exists, disabling multiplexing\r\n")
        sys.exit(0)
    open(master, "w").close()
    sys.exit(0)
if not os.path.exists(master):
    # ControlMaster=auto would log in itself: a host that asks for a code refuses it.
    sys.stderr.write(DENIED)
    sys.exit(255)
sys.exit(subprocess.call(["sh", "-c", args[-1]]))
