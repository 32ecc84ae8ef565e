"""``sheepdog dashboard``: a read-only web page of the requests in a database.

:mod:`.data` reads and aggregates (a request of any size becomes a bounded
page), :mod:`.svg` draws the timeline, throughput and progress bar on the
server, :mod:`.views` is the Flask Blueprint and its guard (loopback only, a
token in the URL), :mod:`.serve` the small server that runs it, and
:mod:`.status` the notebook's view of one request (:func:`sheepdog.status`).
"""

from __future__ import annotations
