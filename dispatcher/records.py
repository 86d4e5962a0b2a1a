"""The kinds of journal record, shared by the core (which makes them) and the journal.

Kept apart from :mod:`falconet.dispatcher.journal` so that the sans-IO core never imports
the file and locking code (``fcntl``) to name a record.
"""

from __future__ import annotations

import enum


class Kind(enum.IntEnum):
    """What a journal record holds; the fields follow in this order."""

    #: client_id, name, batch, submitted (wall s), [TaskSpec...]: a batch accepted
    SUBMIT = 1
    #: client_id, [TaskResult...]: final outcomes, kept until the client acknowledges them
    RESULTS = 2
    #: client_id, [seq...]: the client has these results; they can be forgotten
    ACK = 3
    #: client_id, [[seq, losses]...]: attempts ended by a lost executor, for the retry limit
    LOSSES = 4
    #: client_id, name, batches high-water mark, [batch...] above it (compaction only)
    CLIENT = 5
    #: client_id, [[seq, kind, body, retries, walltime_s, needs, files, submitted, losses]...] (compaction only)
    TASKS = 6
