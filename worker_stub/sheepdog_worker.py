"""sheepdog worker stub: runs in every Grid Engine array task of a sheepdog job.

Standard library only, Python 3.6+. It is pasted into every job file, so it is
kept short and readable. The protocol it speaks is documented in
docs/protocol.rst of the sheepdog project.
"""

# ---- decoding: functions and values (see sheepdog/serialisation.py) ----

# ---- end decoding ----

# ---- protocol client ----

# ---- end protocol client ----
