"""sheepdog worker stub: runs in every array task of a sheepdog job (Grid Engine, Slurm).

Standard library only, Python 3.6+, one file that needs nothing else. sheepdog writes it
once per version beside the job files, as sheepdog_worker-<digest>.py, and each job
file runs it with its request's arguments (``Client(url, None, request_id, array index,
...).go()``), so that a job file stays short enough to read at a glance. The protocol it
speaks is documented in docs/protocol.rst of the sheepdog project. Exit status: 0 when
no work is left, 3 protocol failure, 4 authentication failure, 5 the function cannot be
loaded here, 6 a task overran its timeout where it could not be interrupted, 7 the
request's secret file (or, says the job file, this stub) cannot be read on this node,
8 the server stayed unreachable and the finished results were spooled to files beside
the job file (docs/failures.rst).
"""

import base64
import binascii
import builtins
import hashlib
import hmac
import http.client
import importlib
import io
import json
import linecache
import marshal
import os
import pickle
import platform
import random
import re
import reprlib
import signal
import socket
import sys
import threading
import time
import traceback
import types
from urllib.parse import urlsplit

# ---- decoding: functions and values (see sheepdog/serialisation.py) ----
# The payload format is described in sheepdog/serialisation.py's docstring; the library
# decodes payloads locally with this same code (the stub loaded as a module).

PAYLOAD_MAGIC = b"SHEEPDOG-FN/1\n"


class PayloadError(RuntimeError):
    """The function payload cannot be loaded by this Python."""


def read_header(payload):
    """Return the payload's JSON header and the offset where its pickle stream starts."""
    end = payload.find(b"\n", len(PAYLOAD_MAGIC))
    if not payload.startswith(PAYLOAD_MAGIC) or end < 0:
        raise PayloadError("this is not a sheepdog function payload (format 1)")
    return json.loads(payload[len(PAYLOAD_MAGIC):end].decode("utf-8")), end + 1


def result_protocol(payload):
    """Pickle protocol for results: the sender's, capped at what this Python writes."""
    return min(read_header(payload)[0]["pickle_protocol"], pickle.HIGHEST_PROTOCOL)


def check_payload(header):
    """Raise PayloadError if this Python cannot load a payload with this header."""
    here = (sys.implementation.name, list(sys.version_info[:2]))
    there = (header["implementation"], header["python_minor"])
    if header["mode"] == "bytecode" and here != there:
        raise PayloadError(
            "the function was sent as bytecode by %s %s, but this worker runs %s %s (%s); "
            "bytecode only loads on the same Python minor version. Either set the `shell` "
            "option to a Python %d.%d on the workers, or send the function in source mode "
            '(mode="source").' % (there[0], header["python"], here[0],
                                  platform.python_version(), sys.executable,
                                  there[1][0], there[1][1]))
    if header["pickle_protocol"] > pickle.HIGHEST_PROTOCOL:
        raise PayloadError(
            "the payload uses pickle protocol %d, but Python %s reads at most %d; set "
            "sheepdog.serialisation.pickle_protocol = %d" % (
                header["pickle_protocol"], platform.python_version(),
                pickle.HIGHEST_PROTOCOL, pickle.HIGHEST_PROTOCOL))


def _empty_cell():
    if False:
        value = None
    return (lambda: value).__closure__[0]


def _cell_setter():
    value = None

    def set_value(new):
        nonlocal value
        value = new
    return set_value.__code__


_CELL_SETTER = _cell_setter()


def _set_cell(cell, value):
    # cell_contents is read-only on Python 3.6: store through a function closing over the cell.
    types.FunctionType(_CELL_SETTER, {}, "set_cell", None, (cell,))(value)


class _FunctionUnpickler(pickle.Unpickler):
    """Reads the payload's pickle stream; rebuilds modules and functions on first sight."""

    def __init__(self, file):
        pickle.Unpickler.__init__(self, file)
        self.functions, self.cells, self.namespaces = {}, {}, {}
        self.modules = set()  # the top-level modules the payload names

    def find_class(self, module, name):
        self.modules.add(module.split(".")[0])
        return pickle.Unpickler.find_class(self, module, name)

    def persistent_load(self, pid):
        if pid[0] == "module":
            self.modules.add(pid[1].split(".")[0])
            try:
                return importlib.import_module(pid[1])
            except ImportError as exc:
                raise PayloadError(
                    "the function needs module %r, which Python %s here cannot import (%s): "
                    "install it on the workers" % (pid[1], platform.python_version(), exc)
                ) from exc
        if len(pid) == 3:
            self.functions[pid[1]] = self.make_function(pid[2])
        return self.functions[pid[1]]

    def cell(self, index):
        if index not in self.cells:
            self.cells[index] = _empty_cell()
        return self.cells[index]

    def make_function(self, spec):
        index, module = spec["namespace"]
        if index not in self.namespaces:
            self.namespaces[index] = {"__builtins__": builtins, "__name__": module}
        namespace = self.namespaces[index]
        if "code" in spec:
            closure = tuple(self.cell(i) for i in spec["closure"]) or None
            code = marshal.loads(spec["code"])  # noqa: S302 - the function its own user sent, signed
            function = types.FunctionType(code, namespace, spec["name"], None, closure)
        else:
            local = {}
            exec(compile(spec["source"], spec["filename"], "exec"), namespace, local)  # noqa: S102 - the function its own user sent, signed
            function = local["__sheepdog_factory__"]()
            cells = dict(zip(function.__code__.co_freevars, function.__closure__ or ()))
            for name, i in spec["closure"]:
                self.cells[i] = cells[name]
        function.__qualname__, function.__doc__ = spec["qualname"], spec["doc"]
        function.__module__ = spec["module"]
        return function


def load_function(payload, modules=None):
    """Rebuild the function (with its globals, closure and defaults) from its payload.

    The top-level modules it names are added to the set `modules`, if given.
    """
    header, start = read_header(payload)
    check_payload(header)
    unpickler = _FunctionUnpickler(io.BytesIO(payload[start:]))
    if modules is not None:
        unpickler.modules = modules
    entry = None
    while True:
        piece = unpickler.load()
        if piece[0] == "entry":
            entry = piece[1]
        elif piece[0] == "global":
            unpickler.namespaces[piece[1]][piece[2]] = piece[3]
        elif piece[0] == "cell":
            _set_cell(unpickler.cell(piece[1]), piece[2])
        elif piece[0] == "set" and piece[2] == "__dict__":
            piece[1].__dict__.update(piece[3])
        elif piece[0] == "set" and piece[2] in ("__defaults__", "__kwdefaults__"):
            setattr(piece[1], piece[2], piece[3])
        elif piece[0] == "lines":  # the sender's source, so tracebacks show the lines
            linecache.cache[piece[1]] = (len(piece[2]), None, piece[2].splitlines(True), piece[1])
        elif piece[0] == "end":
            return entry
        else:
            raise PayloadError("unknown piece %r in the function payload" % (piece[0],))


def module_version(name):
    """Whether module `name` imports here, and its version: [True, "1.2" or None] or
    [False, why]. Python 2 must parse it too: sheepdog doctor's probe job runs it."""
    try:
        module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - not only ImportError: a module may fail as it is imported
        return [False, "%s: %s" % (type(e).__name__, e)]
    import warnings
    with warnings.catch_warnings():  # some packages deprecate __version__ (Flask 3.1)
        warnings.simplefilter("ignore")
        version = getattr(module, "__version__", None)
    if not isinstance(version, str):
        try:
            from importlib import metadata  # novermin: Python < 3.8 takes the except
            version = metadata.version(name)
        except Exception:  # noqa: BLE001 - Python < 3.8, not a distribution (the stdlib), bad metadata
            version = None
    return [True, version]


#: At most this many modules are reported (docs/protocol.rst, "lease").
MAX_MODULES = 100


def environment(modules):
    """This Python's version and each module's [imports, version], for the server.

    The standard library's modules are left out where Python lists them (3.10+).
    """
    skip = set(getattr(sys, "stdlib_module_names", ())) | {"builtins", "__main__"}
    names = sorted(m for m in modules if m not in skip)[:MAX_MODULES]
    return {"python": platform.python_version(),
            "modules": dict((name, module_version(name)) for name in names)}


def load_value(data):
    """Unpickle an argument value."""
    return pickle.loads(data)  # noqa: S301 - arguments its own user sent, signed


def dump_value(obj, protocol):
    """Pickle a result value with the given protocol."""
    return pickle.dumps(obj, protocol)


class Pickled:
    """A pickle kept as the pieces the pickler wrote, to be sent or hashed piece by piece.

    From protocol 4 on (Python 3.8+), the pickler hands a large bytes value over as it
    is: the pickle of a 20 MB bytes result then costs no copy of it.
    """

    def __init__(self, obj, protocol):
        self.parts, self.size = [], 0
        pickle.Pickler(self, protocol).dump(obj)

    def write(self, data):
        # bytes are kept as they are: nothing can change them. Any other piece (the
        # buffer of a bytearray or an array) is copied now: the next task may change
        # it while this result goes up.
        piece = data if type(data) is bytes else bytes(data)
        self.parts.append(piece)
        self.size += len(piece)
        return len(piece)

    def __len__(self):
        return self.size

    def __iter__(self):
        return iter(self.parts)

    def sha256(self):
        hasher = hashlib.sha256()
        for part in self.parts:
            hasher.update(part)
        return hasher.hexdigest()

    def join(self):
        return b"".join(self.parts)


def sha256_hex(data):
    """The SHA-256 (hex) of bytes or of a Pickled."""
    return data.sha256() if isinstance(data, Pickled) else hashlib.sha256(data).hexdigest()


def blob_ref(data):
    """The reference a result names its large value by: {sha256, size}."""
    return {"sha256": sha256_hex(data), "size": len(data)}


def as_bytes(data):
    """Bytes, or a Pickled joined into bytes."""
    return data.join() if isinstance(data, Pickled) else data

# ---- end decoding ----

# ---- protocol client ----
# Exit statuses, so that qacct and the SGE .e file say why a worker stopped.
EXIT_PROTOCOL = 3  # the server stayed unreachable, refused a call or answered nonsense
EXIT_AUTH = 4  # the server rejected our signature, or an answer was not signed by it
EXIT_VERSION = 5  # the function cannot be loaded here (another Python version, a missing module)
EXIT_STUCK = 6  # a task overran its timeout where Python could not interrupt it
EXIT_SECRET = 7  # the request's secret file cannot be read here (ssh_dir is not shared?)
EXIT_SPOOLED = 8  # the server stayed unreachable; finished results were written to the spool
#: A spool file's first line: what it is and its format's version.
SPOOL_MAGIC = "sheepdog-spool/1"
#: Time kept free before a run-time limit (h_rt): the job started a little before this script
#: (the shell, a prologue), and the last results must still reach the server.
RUN_LIMIT_MARGIN_S = 5.0
#: When this worker started, for its run-time limit: Grid Engine tells no job its h_rt.
STARTED_S = time.monotonic()


def tasks_to_lease(wanted, run_limit_s, elapsed_s, longest_s, margin_s=RUN_LIMIT_MARGIN_S):
    """How many tasks to lease next: ``wanted``, or fewer (0: stop) near a run-time limit.

    None leased once the time left before the limit is shorter than the longest task this
    worker has run; before it has run one (``longest_s`` 0), one task, to learn how long
    tasks take.
    """
    if run_limit_s is None or wanted <= 0:
        return wanted
    left_s = run_limit_s - elapsed_s - margin_s
    if longest_s <= 0:
        return 1 if left_s > 0 else 0
    return max(0, min(wanted, int(left_s // longest_s)))


class ProtocolFailure(Exception):
    """The worker cannot go on; `exit_status` says why; `unreachable`: no answer came at all."""

    def __init__(self, message, exit_status=EXIT_PROTOCOL, unreachable=False):
        super().__init__(message)
        self.exit_status, self.unreachable = exit_status, unreachable


class TaskTimeout(BaseException):  # not Exception: a task's `except Exception` must not eat it
    """A task ran past task_timeout_s."""


def backoff_delay(attempt, base_s=0.5, cap_s=30.0, rand=random.random):
    """Seconds to wait before retry `attempt` (from 0): full jitter under a capped exponential."""
    return rand() * min(cap_s, base_s * 2 ** min(attempt, 32))


def sign_request(secret_hex, method, path, time_s, nonce, length, body_sha256):
    """Sign a call as docs/protocol.rst says (as sheepdog/server/auth.py does)."""
    message = "%s\n%s\n%s\n%s\n%d\n%s" % (method.upper(), path, time_s, nonce, length,
                                          body_sha256)
    return hmac.new(bytes.fromhex(secret_hex), message.encode(), hashlib.sha256).hexdigest()


def signed_headers(secret_hex, method, path, body, time_s=None, nonce=None, body_sha256=None):
    """Return the headers that sign one call: time, a fresh nonce, the body's hash, signature.

    `body_sha256`: the body's SHA-256 (hex) when the caller has it: a large value's upload
    is named by it, and hashing 20 MB again costs 20 ms.
    """
    stamp = str(int(time.time()) if time_s is None else time_s)
    nonce = nonce or binascii.hexlify(os.urandom(16)).decode("ascii")
    digest = body_sha256 or hashlib.sha256(body).hexdigest()
    return {"X-Sheepdog-Time": stamp, "X-Sheepdog-Nonce": nonce, "X-Sheepdog-Body-SHA256": digest,
            "X-Sheepdog-Signature": sign_request(secret_hex, method, path, stamp, nonce,
                                                 len(body), digest)}


def sign_response(secret_hex, request_signature, body, body_sha256=None):
    """Sign an answer to the call that carried `request_signature` (body's hash if known)."""
    message = "response\n%s\n%s" % (request_signature,
                                     body_sha256 or hashlib.sha256(body).hexdigest())
    return hmac.new(bytes.fromhex(secret_hex), message.encode(), hashlib.sha256).hexdigest()


def spool_signature(secret_hex, request_id, index, result_text):
    """Sign a spooled result: its request, task and JSON text (as sheepdog/spool.py does)."""
    message = "spool\n%d\n%d\n%s" % (request_id, index,
                                        hashlib.sha256(result_text.encode("utf-8")).hexdigest())
    return hmac.new(bytes.fromhex(secret_hex), message.encode(), hashlib.sha256).hexdigest()


def write_private(path, data):
    """Write bytes to `path` whole (a temporary file, fsync, rename), readable by us only."""
    temp = os.path.join(os.path.dirname(path), ".tmp-" + binascii.hexlify(os.urandom(8)).decode())
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def spool_results(directory, secret_hex, request_id, results, payloads):
    """Write each result to its own signed 0600 file in `directory`; return how many.

    A large value (in `payloads`, by task index) goes into a blob file beside its
    result, written first: a result file is only there once all it names is.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for result in results:
        stem = "%d-%s" % (result["index"], binascii.hexlify(os.urandom(8)).decode())
        payload = payloads.get(result["index"]) if result.get("ok") else None
        record = dict(result)
        if payload is not None:
            record["blob"] = blob_ref(payload)
            record.pop("value", None)
            write_private(os.path.join(directory, stem + ".blob"), as_bytes(payload))
        text = json.dumps(record, sort_keys=True)
        head = {"format": SPOOL_MAGIC, "request_id": request_id, "index": result["index"],
                "blob": stem + ".blob" if payload is not None else None,
                "signature": spool_signature(secret_hex, request_id, result["index"], text)}
        write_private(os.path.join(directory, stem + ".json"),
                      (json.dumps(head, sort_keys=True) + "\n" + text + "\n").encode("utf-8"))
    return len(results)


def read_secret(path):
    """Return the request's secret (hex) from its key file, or say plainly why it cannot."""
    host = socket.gethostname()
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            secret = f.read(4096).strip()
    except FileNotFoundError:
        raise ProtocolFailure(
            "the request's secret file %s does not exist on %s. sheepdog writes it on the head "
            "node beside the job file, in ssh_dir, and the job file holds only its path, so the "
            "execution nodes must see ssh_dir at the same path: set ssh_dir to a directory on a "
            "file system shared by the head node and the execution nodes (such as your home "
            "directory)" % (path, host), EXIT_SECRET) from None
    except OSError as e:
        raise ProtocolFailure("cannot read the request's secret file %s on %s (%s); it must be "
                              "readable by the user the job runs as" % (path, host, e),
                              EXIT_SECRET) from None
    if not re.match(r"^(?:[0-9a-fA-F]{2}){16,}$", secret):
        raise ProtocolFailure("the request's secret file %s on %s does not hold a secret (hex "
                              "digits); was it overwritten?" % (path, host), EXIT_SECRET)
    return secret


def safe_text(obj):
    """str(obj), or a stand-in when its __str__ raises: a task's exception may do anything."""
    try:
        return str(obj)
    except BaseException as e:  # noqa: BLE001 - whatever __str__ raises, the task is reported
        try:
            return "<unprintable %s: str() raised %s>" % (type(obj).__name__, type(e).__name__)
        except Exception:  # noqa: BLE001 - even the type's name may fail to print
            return "<unprintable object>"


def short_repr(value):
    """A short repr of a task's value: reprlib's, but not of all of a large bytes value."""
    if isinstance(value, (bytes, bytearray)) and len(value) > 64:
        # reprlib.repr of bytes reprs the whole value before cutting it: 80 MB of text
        # for a 20 MB result.
        return "%r... (%d bytes)" % (bytes(value[:16]), len(value))
    return reprlib.repr(value)


def say(message, stream):
    stream.write(message + "\n")
    stream.flush()


class Capture:
    """Stands in for sys.stdout/stderr during a task: passes writes on and keeps `limit` bytes."""

    def __init__(self, stream, limit):
        self.stream, self.limit, self.kept, self.dropped = stream, limit, bytearray(), 0

    def write(self, text):
        self.stream.write(text)  # tee, so that the SGE .o/.e files still have everything
        data = text.encode("utf-8", "replace")
        room = max(self.limit - len(self.kept), 0)
        self.kept += data[:room]
        self.dropped += max(len(data) - room, 0)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def text(self):
        text = self.kept.decode("utf-8", "ignore")  # the cut may split a character
        if self.dropped:
            text += "\n[sheepdog: %d more bytes not kept; see the SGE output files]" % self.dropped
        return text

    def __getattr__(self, name):
        return getattr(self.stream, name)


#: What the address file holds: host:port, with an IPv6 host in brackets.
ADDRESS_LINE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")
#: How long an array task keeps trying to reach the server the first time.
FIRST_CONTACT_S = 120.0
#: A call still retried this long after it was signed is signed again with a new nonce:
#: the server refuses a time more than 900 s from its own clock, and clocks may differ.
RESIGN_AFTER_S = 300.0


class Connection:
    """A keep-alive HTTP(S) connection that signs calls, checks the answers and retries."""

    def __init__(self, url, secret, request_id, retry_s=600.0, tls_fingerprint=None,
                 timeout_s=60.0, address_file=None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ProtocolFailure("the server URL %r is not an http:// or https:// URL" % url)
        self.https, self.address = parts.scheme == "https", (parts.hostname, parts.port)
        # Where sheepdog writes the server's current host:port (a tunnel's relay may move
        # to another port); the job file's URL is the fallback.
        self.address_file, self.job_address = address_file, self.address
        self.prefix = "%s/api/v1/requests/%d/" % (parts.path.rstrip("/"), request_id)
        self.secret, self.request_id, self.retry_s = secret, request_id, retry_s
        self.fingerprint = (tls_fingerprint or "").replace(":", "").lower()
        self.timeout_s, self.conn = timeout_s, None

    def current_address(self):
        """The server's address from the address file, read now; the job file's without one."""
        if not self.address_file:
            return self.job_address
        try:
            with open(self.address_file) as f:
                text = f.read(512).strip()
        except (OSError, UnicodeDecodeError):
            return self.job_address
        found = ADDRESS_LINE.match(text)
        if not found:
            say("sheepdog: ignoring the address file %s: %r is not host:port"
                % (self.address_file, text[:80]), sys.stderr)
            return self.job_address
        return (found.group(1).strip("[]"), int(found.group(2)))

    def connect(self):
        self.address = self.current_address()  # at every (re)connection: a retry finds a move
        if not self.https:
            conn = http.client.HTTPConnection(*self.address, timeout=self.timeout_s)
        else:
            import ssl
            context = ssl.create_default_context()
            if self.fingerprint:  # a self-signed certificate, trusted by its pinned fingerprint
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            conn = http.client.HTTPSConnection(*self.address, timeout=self.timeout_s,
                                               context=context)
        conn.auto_open = 0  # reconnect only through here, where the fingerprint is checked
        conn.connect()
        if self.https and self.fingerprint:
            seen = hashlib.sha256(conn.sock.getpeercert(binary_form=True)).hexdigest()
            if not hmac.compare_digest(seen, self.fingerprint):
                conn.close()
                raise ProtocolFailure("the server's TLS certificate has SHA-256 fingerprint %s, "
                                      "the job file pins %s" % (seen, self.fingerprint), EXIT_AUTH)
        return conn

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(self, method, path, body, headers, sink=None, kind="application/json"):
        """One exchange of a signed call: return (status, its answer's signature, answer body).

        With `sink`, a 200 answer's body is not returned but passed to sink(response).
        """
        self.conn = self.conn or self.connect()
        try:
            extra = {"Content-Type": kind}
            if isinstance(body, Pickled):  # sent piece by piece, not chunked
                extra["Content-Length"] = str(len(body))
            self.conn.request(method, path, body=body, headers=dict(headers, **extra))
            response = self.conn.getresponse()
            if sink is not None and response.status == 200:
                answer = sink(response)
            else:
                answer = response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, response.getheader("X-Sheepdog-Signature", ""), answer

    def upload(self, data, retry_s=None):
        """PUT a large value as a binary body, named by its SHA-256; return {sha256, size}."""
        digest = sha256_hex(data)
        self.call("PUT", "blobs/" + digest, raw=data, retry_s=retry_s, raw_sha256=digest)
        return {"sha256": digest, "size": len(data)}

    def download(self, name, sha256, size, retry_s=None):
        """GET a binary body that a signed answer named by its SHA-256 and size; return it."""
        def sink(response):  # read into one buffer, hashing as the bytes arrive
            data, hasher, got = bytearray(size), hashlib.sha256(), 0
            view = memoryview(data)
            while got < size:
                n = response.readinto(view[got:got + (1 << 20)])
                if not n:
                    raise http.client.IncompleteRead(bytes(0), size - got)
                hasher.update(view[got:got + n])
                got += n
            if response.read(1) or hasher.hexdigest() != sha256:
                raise ProtocolFailure("%s from the server is not the %d bytes with SHA-256 %s "
                                      "that its signed lease named" % (name, size, sha256),
                                      EXIT_AUTH)
            return data
        return self.call("GET", name, retry_s=retry_s, sink=sink, sink_sha256=sha256)

    def call(self, method, name, body=None, retry_s=None, raw=None, sink=None, sink_sha256=None,
             raw_sha256=None):
        """Make a signed call to .../requests/<id>/<name>; return its checked JSON answer.

        Connection errors and 5xx answers are retried with backoff for up to
        `retry_s` seconds; any other failure raises ProtocolFailure at once. A retry
        sends the same signed call (the same nonce), so a call whose answer was lost
        gets that same answer, not a second effect; after RESIGN_AFTER_S it is signed
        anew, so that a retry stays inside the server's clock window. `raw` is a binary
        body sent instead of JSON (`raw_sha256`: its SHA-256, if known); with `sink`, the
        200 answer is what sink(response) returns: a binary answer that sink checked to
        have SHA-256 `sink_sha256`.
        """
        path = self.prefix + name
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        kind = "application/json" if raw is None else "application/octet-stream"
        retry_s = self.retry_s if retry_s is None else retry_s
        deadline, attempt, rid = time.monotonic() + retry_s, 0, self.request_id
        signed_at, headers = time.monotonic(), signed_headers(self.secret, method, path, data,
                                                              body_sha256=raw_sha256)
        while True:
            if attempt and time.monotonic() - signed_at > RESIGN_AFTER_S:
                if isinstance(body, dict) and "max_tasks" in body:
                    # A new call now, not the same one again: should the first try have
                    # leased tasks whose answer never came back, "retry" has the server
                    # hand those to us again instead of leaving them orphaned.
                    data = json.dumps(dict(body, retry=True)).encode()
                signed_at, headers = time.monotonic(), signed_headers(
                    self.secret, method, path, data, body_sha256=raw_sha256)
            try:
                status, given, answer = self.send(method, path, data, headers, sink, kind)
                if status < 500:
                    break
                problem = "the server answered HTTP %d" % status
            except (OSError, http.client.HTTPException) as e:
                problem = "cannot reach the server at %s:%s (%r)" % (self.address + (e,))
            delay = backoff_delay(attempt)
            if time.monotonic() + delay > deadline:
                raise ProtocolFailure("%s; gave up on %s %s after retrying for %g s"
                                      % (problem, method, path, retry_s), unreachable=True)
            say("sheepdog: %s; retrying in %.1f s" % (problem, delay), sys.stderr)
            time.sleep(delay)
            attempt += 1
        signature, detail = headers["X-Sheepdog-Signature"], ""
        try:
            if status >= 300:  # a refusal's reason; a 200 answer may be a 20 MB binary
                error = json.loads(answer.decode("utf-8"))["error"]
                detail = "%s: %s" % (error["code"], error["message"])
        except (KeyError, TypeError, ValueError):  # not JSON, or not an error's shape
            detail = answer[:200].decode("utf-8", "replace")
        if status == 401:
            raise ProtocolFailure("the server rejected our signature (%s): the job file's secret "
                                  "does not match request %d, or this node's clock is far off - "
                                  "was the database replaced?" % (detail, rid), EXIT_AUTH)
        if status == 404:
            raise ProtocolFailure("the server does not know request %d (%s) - was the database "
                                  "replaced, or another server started here?" % (rid, detail))
        if not 200 <= status < 300:
            raise ProtocolFailure("the server refused %s %s with HTTP %d (%s)"
                                  % (method, path, status, detail))
        binary = sink is not None and status == 200
        expected = sign_response(self.secret, signature, answer, sink_sha256 if binary else None)
        if not hmac.compare_digest(expected.encode(), given.encode("latin-1", "replace")):
            raise ProtocolFailure("the answer to %s %s is not signed with request %d's secret: "
                                  "another server answers at %s:%s, or something on the way "
                                  "changed it" % ((method, path, rid) + self.address), EXIT_AUTH)
        if binary:
            return answer
        try:
            return json.loads(answer.decode("utf-8"))
        except ValueError:
            raise ProtocolFailure("the answer to %s %s is not JSON: %r"
                                  % (method, path, answer[:200])) from None


def is_unpacked(value):
    """Whether a task's argument is spread into positional arguments: a tuple or a list.

    Sheepdog 0.2 called ``f(*arg)``; any other value is passed as the one argument.
    """
    return isinstance(value, (tuple, list))


class Uploader:
    """Uploads a large result and posts it, in a thread of its own, while the worker runs on.

    One result at a time: hand() first waits until the last one is posted, so a worker
    holds at most two large values (the one going up, the one its next task makes). A
    failure is never dropped: the result and its value are kept with the error, for
    the worker to take back with wait() and post itself or spool.
    """

    def __init__(self, connect, post):
        self.connect, self.post = connect, post  # post(conn, result) sends /results
        self.lock = threading.Condition()
        self.job = None  # (result, payload) handed over and not yet posted
        self.failure = None  # (error, result, payload) of the last job, once it failed
        self.thread = None

    def holds(self, index):
        """Whether the result of task `index` is being uploaded or posted."""
        job = self.job
        return job is not None and job[0]["index"] == index

    def leases(self):
        """The lease of the result being posted, which the heartbeat must keep renewing."""
        job = self.job
        return [job[0]["lease"]] if job is not None else []

    def hand(self, result, payload):
        """Start uploading `payload` and posting `result` with it; wait() for the last first."""
        with self.lock:
            if self.job is not None or self.failure is not None:
                raise RuntimeError("the last result must be waited for before the next")
            self.job = (result, payload)
            self.lock.notify_all()
        if self.thread is None:
            self.thread = threading.Thread(target=self.loop, name="sheepdog-upload", daemon=True)
            self.thread.start()

    def wait(self, timeout_s=None):
        """Wait until the result handed over last is posted; return (error, result, payload)
        if that failed (then forgotten here), else None. Bounded: every call the uploader
        makes is (retry_s, and the connection's timeout); a caller may bound it further."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self.lock:
            while self.job is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.lock.wait(left)
            failure, self.failure = self.failure, None
        return failure

    def loop(self):
        conn = None
        while True:
            with self.lock:
                while self.job is None:
                    self.lock.wait()
                result, payload = self.job
            failure = None
            try:
                conn = conn or self.connect()  # its own: http.client connections are not shared
                self.post(conn, dict(result, blob=conn.upload(payload)))
            except BaseException as e:  # noqa: BLE001 - kept with the result, for the worker
                failure = (e, result, payload)
            with self.lock:
                self.job, self.failure = None, failure
                self.lock.notify_all()


class Client:
    """Find out what to do, do it, report back: the worker side of one array task."""

    def __init__(self, url, password, request_id, job_index, batch=None, retry_s=600.0,
                 tls_fingerprint=None, mem_limit_bytes=None, stuck_grace_s=30.0,
                 secret_file=None, run_limit_s=None, spool_dir=None, address_file=None):
        self.request_id, self.job_index = int(request_id), job_index
        # The job's h_rt or --time in seconds, and its memory request in bytes, as the job file
        # passes them from its directives. The worker stops leasing before the run-time limit
        # (see tasks_to_lease) and limits its address space to the memory (set_memlimit).
        self.run_limit_s, self.longest_s = run_limit_s, 0.0
        self.host = socket.gethostname()
        self.worker = "%s:%d:%s" % (self.host, os.getpid(), job_index)
        self.batch, self.mem_limit_bytes = batch, mem_limit_bytes
        # Job files name a 0600 key file instead of holding the secret: Grid Engine copies
        # job scripts world-readable into each execution node's spool. It is read in go().
        self.password, self.secret_file = password, secret_file
        self.connect = lambda: Connection(url, self.password, self.request_id, retry_s,
                                          tls_fingerprint, address_file=address_file)
        self.conn = self.connect()
        self.out, self.err = sys.stdout, sys.stderr  # the real streams, whatever a task does
        self.function, self.protocol, self.settings = None, None, {}
        self.load_error = None  # why the function cannot be loaded here, as a task error
        self.environment = None  # Python and module versions, sent with the first lease
        self.leases, self.lost, self.cancelled = [], set(), False
        self.running = None  # (index, lease, start, stdout Capture, stderr Capture)
        self.armed = False  # whether SIGALRM may interrupt the running task now
        self.stuck_grace_s = stuck_grace_s  # past the timeout, SIGALRM's time before the backstop
        # Where finished results go when the server stays unreachable (None: they are lost),
        # and, until the server has them, the pickled large values (by task index).
        self.spool_dir, self.payloads, self.unreachable = spool_dir, {}, None
        # Posts large results in the background while the next task runs (see Uploader).
        self.uploader = Uploader(self.connect, lambda conn, result: conn.call(
            "POST", "results", dict(self.hello(0), results=[result])))

    def go(self):
        """Run tasks until none is left; on a failure say why on stderr and exit non-zero."""
        try:
            if self.secret_file is not None:
                self.password = read_secret(self.secret_file)
                self.conn = self.connect()
            self.set_memlimit()
            self.get_details()
            try:
                self.run()
            finally:  # a result being posted in the background is never cut off by our exit
                self.uploader.wait()
        except ProtocolFailure as e:
            say("sheepdog: worker %s stops: %s" % (self.worker, e), self.err)
            sys.exit(e.exit_status)
        except (KeyError, TypeError, ValueError) as e:
            say("sheepdog: worker %s stops: an answer from the server is not as docs/protocol.rst"
                " says (%s: %s)" % (self.worker, type(e).__name__, safe_text(e)), self.err)
            sys.exit(EXIT_PROTOCOL)
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the worker reports anything, never a bare traceback
            # Never let a traceback reach the job file's own last line: it is printed from
            # here down only, and the worker exits with a status that qacct shows.
            say("sheepdog: worker %s stops on an unexpected %s: %s\n%s" % (
                self.worker, type(e).__name__, safe_text(e), safe_text(traceback.format_exc())),
                self.err)
            sys.exit(EXIT_PROTOCOL)
        say("sheepdog: worker %s: no tasks left" % self.worker, self.out)

    def set_memlimit(self):
        """Limit our address space to mem_limit_bytes (the job's memory request), if set."""
        limit = self.mem_limit_bytes
        if limit:
            import resource
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return limit

    def get_details(self):
        """Fetch the function and the request's settings."""
        # An array task that starts after its map is over finds no server; it must not hold
        # a slot for long. Once it has reached the server, retries go on for retry_s.
        answer = self.conn.call("GET", "function", retry_s=min(self.conn.retry_s, FIRST_CONTACT_S))
        self.settings, payload = answer["settings"], base64.b64decode(answer["payload"])
        modules = set()
        try:
            self.function = load_function(payload, modules)
            self.protocol = result_protocol(payload)
            self.environment = environment(modules)
        except Exception as e:  # noqa: BLE001 - any load failure is every leased task's error
            # Every task this worker leases fails with the reason, so the user sees it in
            # get_errors at once instead of waiting on work no worker here can load.
            self.load_error = {"type": type(e).__name__, "kind": "load", "host": self.host,
                               "python": sys.version.split()[0], "traceback": "",
                               "message": "cannot load the function on %s (Python %s): %s" % (
                                   self.host, sys.version.split()[0], e)}

    def run(self):
        """Lease tasks and run them; each batch's results go back with the next lease."""
        if self.function is None and self.load_error is None:
            # Leasing now would fail every task leased; Sheepdog 0.2 refused too.
            raise RuntimeError("Must call `get_details` before `run`.")
        batch = int(self.batch or self.settings.get("batch") or 1)
        left = self.settings.get("tasks_per_worker")  # None: until no work is left
        threading.Thread(target=self.watch, name="sheepdog-heartbeat", daemon=True).start()
        first = self.hello(self.how_many(batch, left))
        if self.environment is not None:
            first["environment"] = self.environment  # once per worker
        answer = self.conn.call("POST", "lease", first)
        while answer["tasks"]:
            if left is not None:
                left -= len(answer["tasks"])
            self.leases, results = [task["lease"] for task in answer["tasks"]], []
            self.payloads = {}
            for task in answer["tasks"]:
                if self.unreachable:
                    break  # the rest go back to pending when their leases run out
                if self.cancelled:
                    say("sheepdog: request %d was cancelled" % self.request_id, self.out)
                    break
                if self.load_error:
                    results.append({"index": task["index"], "lease": task["lease"], "ok": False,
                                    "error": self.load_error, "stdout": "", "stderr": "",
                                    "duration_s": 0.0})
                elif task["lease"] in self.lost or self.uploader.holds(task["index"]):
                    # Leased again to another worker; or, after a retried lease, handed back
                    # to us while our uploader still posts its result.
                    continue
                else:
                    result, payload = self.execute(task)
                    self.longest_s = max(self.longest_s, result["duration_s"])
                    if payload is None:
                        results.append(result)
                    elif self.room_to_hand_over(len(payload)):
                        self.hand_over(result, payload, results)
                    else:  # uploaded here, before the next task makes its value
                        self.take_back(results)
                        results.append(dict(result, **self.encode_value(payload, task["index"])))
            more = 0 if self.cancelled else self.how_many(batch, left)
            answer = self.submit_or_spool(results, more)
            if not more:
                break
        results = []
        self.take_back(results)
        if results:
            self.submit_or_spool(results, 0)
        self.leases = []
        if self.load_error:
            raise ProtocolFailure(self.load_error["message"], EXIT_VERSION)

    def how_many(self, batch, left):
        """How many tasks to ask for next: a batch, the tasks_per_worker left, the time left."""
        wanted = batch if left is None else min(batch, left)
        more = tasks_to_lease(wanted, self.run_limit_s, time.monotonic() - STARTED_S,
                              self.longest_s)
        if wanted and not more:
            say("sheepdog: worker %s stops leasing: its run-time limit (h_rt) of %g s is near"
                " (%.0f s run, longest task %.1f s)" % (
                    self.worker, self.run_limit_s, time.monotonic() - STARTED_S, self.longest_s),
                self.out)
        return more

    def hello(self, max_tasks):
        return {"worker": self.worker, "host": self.host, "max_tasks": max_tasks}

    def room_to_hand_over(self, size):
        """Whether a value of `size` bytes may go up while the next task runs.

        Under a memory limit (the job's request) only if four such fit in it: the one
        going up, and the next task's value and its pickle, with room to spare.
        """
        return not self.mem_limit_bytes or 4 * size <= self.mem_limit_bytes

    def hand_over(self, result, payload, results):
        """Have the uploader upload a large value and post its result while we run on.

        A result the uploader failed to post comes back into `results` first (take_back).
        """
        self.take_back(results)
        if self.unreachable:  # the server is gone: keep this one for the spool too
            results.append(self.kept_for_spool(result, payload))
        else:
            self.uploader.hand(result, payload)

    def take_back(self, results):
        """Wait for the uploader; a result it failed to post goes into `results`, uploaded.

        Where the server stayed unreachable and there is a spool, the value is kept for it;
        after any other failure, the upload is tried again here, as any call is.
        """
        failure = self.uploader.wait()
        if failure is None:
            return
        error, result, payload = failure
        say("sheepdog: task %d's result did not go up in the background (%s: %s); "
            "sending it again" % (result["index"], type(error).__name__, safe_text(error)),
            self.err)
        if isinstance(error, ProtocolFailure) and error.unreachable and self.spool_dir:
            self.unreachable = error
            results.append(self.kept_for_spool(result, payload))
        else:
            results.append(dict(result, **self.encode_value(payload, result["index"])))

    def kept_for_spool(self, result, payload):
        """`result` naming its large value, which is kept (by index) for the spool."""
        self.payloads[result["index"]] = payload
        return dict(result, blob=blob_ref(payload))

    def submit_or_spool(self, results, max_tasks):
        """Post results and lease more; if the server stays unreachable, spool them and stop.

        The uploader's result goes into the spool too (take_back waits for it first).
        """
        try:
            if self.unreachable:
                raise self.unreachable
            return self.submit_results(results, max_tasks)
        except ProtocolFailure as e:
            if e.unreachable and self.spool_dir:
                results = list(results)
                self.take_back(results)
            if not (e.unreachable and self.spool_dir and results):
                raise
            try:
                n = spool_results(self.spool_dir, self.password, self.request_id, results,
                                  self.payloads)
            except OSError as oe:
                raise ProtocolFailure("%s; and the %d finished results could not be spooled to "
                                      "%s (%s): they are lost" % (e, len(results),
                                                                  self.spool_dir, oe)) from None
            raise ProtocolFailure(
                "%s; spooled %d finished results to %s, where sheepdog collects them when it is "
                "back (sheepdog attach %d)" % (e, n, self.spool_dir, self.request_id),
                EXIT_SPOOLED) from None

    def submit_results(self, results, max_tasks=0):
        """Post results; the answer holds the next lease when max_tasks > 0."""
        return self.conn.call("POST", "results", dict(self.hello(max_tasks), results=results))

    def run_task(self, task):
        """Run one leased task, print how it went, and return its result for /results."""
        result, payload = self.execute(task)
        if payload is not None:  # a failed upload stops the worker, as any call does
            result.update(self.encode_value(payload, task["index"]))
        return result

    def execute(self, task):
        """Run one leased task and print how it went; return (result, large value or None).

        A value longer than inline_max_bytes is returned apart, not yet in the result:
        the caller uploads it (Uploader) or encodes it (run_task).
        """
        index, limit = task["index"], int(self.settings.get("capture_bytes", 65536))
        timeout = self.settings.get("task_timeout_s")
        alarm = bool(timeout) and threading.current_thread() is threading.main_thread()
        # Fetched before the task's clock starts; a failure here stops the worker, it is not
        # the task's error.
        blob = task.get("args_blob")
        data = (self.conn.download("tasks/%d/args" % index, blob["sha256"], blob["size"])
                if blob else base64.b64decode(task["args"]))
        out, err = Capture(self.out, limit), Capture(self.err, limit)
        result, value, start = {"index": index, "lease": task["lease"]}, None, time.monotonic()
        self.running = (index, task["lease"], start, out, err)
        sys.stdout, sys.stderr = out, err
        try:
            try:
                if alarm:
                    signal.signal(signal.SIGALRM, self.on_alarm)
                    self.armed = True
                    signal.setitimer(signal.ITIMER_REAL, timeout)
                value, data = load_value(data), None
                # Two short lines: this one shows in every remote traceback, which
                # must fit an 80-column terminal.
                if is_unpacked(value):
                    value = self.function(*value)
                else:
                    value = self.function(value)
                payload = Pickled(value, self.protocol)
            finally:  # an alarm that fires in here is still caught below
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    self.armed = False
            result["ok"] = True
        except (Exception, TaskTimeout, SystemExit) as e:  # noqa: BLE001 - whatever a task raises is its result
            result.update(ok=False, error=self.describe(e, traceback.format_exc()))
        finally:
            sys.stdout, sys.stderr, self.running = out.stream, err.stream, None
        result.update(stdout=out.text(), stderr=err.text(), duration_s=time.monotonic() - start)
        large = None
        if result["ok"]:
            if self.is_large(payload):
                large = payload
            else:
                result.update(self.encode_value(payload, index))
        if result["ok"]:
            say("sheepdog: task %d ok: %s" % (index, short_repr(value)), self.out)
        else:
            error = result["error"]
            say("sheepdog: task %d error: %s: %s" % (index, error["type"], error["message"]),
                self.out)
            say(error["traceback"].rstrip(), self.err)
        return result, large

    def is_large(self, payload):
        """Whether a pickled value goes up as a blob (over inline_max_bytes), not inline."""
        inline_max = self.settings.get("inline_max_bytes")
        return inline_max is not None and len(payload) > inline_max

    def encode_value(self, payload, index=None):
        """A result's value for /results: inline base64, or a blob uploaded first if large.

        A large value is kept until the server has its result, to be spooled if it never
        does; an upload that finds the server unreachable leaves it for the spool.
        """
        if self.is_large(payload):
            if self.spool_dir and index is not None:
                self.payloads[index] = payload
            try:
                return {"blob": self.conn.upload(payload)}
            except ProtocolFailure as e:
                if not (e.unreachable and self.spool_dir):
                    raise
                self.unreachable = e
                return {"blob": blob_ref(payload)}
        return {"value": base64.b64encode(as_bytes(payload)).decode("ascii")}

    def on_alarm(self, signum, frame):
        if self.armed:
            self.armed = False
            raise TaskTimeout("timed out after %g s" % self.settings["task_timeout_s"])

    def describe(self, exc, trace):
        """The error record of a task's exception; survives any exception object."""
        kind = type(exc)
        try:
            module = kind.__module__
            name = kind.__name__ if module in ("builtins", "__main__") else (
                "%s.%s" % (module, kind.__qualname__))
            name = safe_text(name)
        except Exception:  # noqa: BLE001 - a metaclass may raise anything
            name = "<unnamed exception>"
        return {"type": "TaskTimeout" if isinstance(exc, TaskTimeout) else name,
                "message": safe_text(exc), "traceback": safe_text(trace), "host": self.host,
                "python": sys.version.split()[0]}

    def watch(self):
        """Renew the leases while tasks run; end the worker if a task is stuck past its timeout."""
        conn = self.connect()  # http.client connections must not be shared between threads
        every = float(self.settings.get("heartbeat_s") or 30.0)
        timeout, last = self.settings.get("task_timeout_s"), time.monotonic()
        while True:
            time.sleep(min(1.0, every))
            running = self.running
            if timeout and running and time.monotonic() - running[2] > timeout + self.stuck_grace_s:
                self.give_up(conn, running, timeout)
            leases = self.leases + self.uploader.leases()
            if leases and time.monotonic() - last >= every:
                last = time.monotonic()
                try:
                    answer = conn.call("POST", "heartbeat",
                                       {"worker": self.worker, "leases": leases}, retry_s=every)
                    self.lost.update(answer.get("lost", []))
                    self.cancelled = self.cancelled or bool(answer.get("cancelled"))
                except ProtocolFailure as e:
                    say("sheepdog: heartbeat failed, our leases may expire: %s" % e, self.err)

    def give_up(self, conn, running, timeout):
        """Report a task that Python could not interrupt as timed out, then end this process."""
        index, lease, start, out, err = running
        stack = sys._current_frames().get(threading.main_thread().ident)
        error = self.describe(TaskTimeout(
            "timed out after %g s (stuck where Python could not interrupt it)" % timeout),
            "Where the task was stuck:\n" + "".join(traceback.format_stack(stack)))
        result = {"index": index, "lease": lease, "ok": False, "error": error, "stdout": out.text(),
                  "stderr": err.text(), "duration_s": time.monotonic() - start}
        say("sheepdog: task %d error: TaskTimeout: %s" % (index, error["message"]), self.out)
        self.uploader.wait(timeout_s=60.0)  # the last task's result, if still going up
        try:
            conn.call("POST", "results", dict(self.hello(0), results=[result]), retry_s=60.0)
        except ProtocolFailure as e:
            say("sheepdog: could not report the timeout: %s" % e, self.err)
            if e.unreachable and self.spool_dir:
                try:
                    spool_results(self.spool_dir, self.password, self.request_id, [result], {})
                    say("sheepdog: spooled its result to %s" % self.spool_dir, self.err)
                except OSError as oe:
                    say("sheepdog: could not spool it either: %s" % oe, self.err)
        os._exit(EXIT_STUCK)

# ---- end protocol client ----
