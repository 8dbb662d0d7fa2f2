"""A session call's answer, read on its request's own ext_proc stream (two messages in all).

A model call that names a session (``x-session-id``; its answer joins the history) matches the
``model-call-session`` path route, whose per-route processing mode sends extproc the request body
alone (the headers as request attributes) and then the response body on the same stream,
STREAMED, with the response headers skipped (``controller.one_message``). What extproc reads of
the skipped headers comes as response attributes with the first body chunk
(``crdgol.request_path.RESPONSE_ATTRIBUTES``): the status, and the cluster that answered, which
the policy maps to the backend (as the access log's consumer does).

``start`` decides, from those, whether this stream accounts for the answer: a provider's 200 is
read to its end here (usage, quota settle, history, the cache's store, translation, usage-chunk
stripping), and the access log is told so with the first reply (``SessionAnswer.mark``).
Anything else is left where the one-message path leaves it: a provider's error is mapped by the
response filter on its own stream and settled there (it joins no history); Envoy's own reply, or
an answer cut off before its first chunk, is settled from the access log.

A JSON answer may come in several chunks (STREAMED mode): ``SessionAnswer.body`` gathers them and
reads the whole at the end; each chunk goes on to the client unchanged as it comes, unless the
answer is translated, which is sent whole at the end (Envoy drops the content-length of a
response whose body ext_proc streams). A stream's chunks are read as they pass, never held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from crdgol.usage_log import SETTLE_NAMESPACE
from extproc.phases import PASS, Continue, Reply, Respond
from extproc.readers import ResponseReader

if TYPE_CHECKING:
    from extproc.model_call import ModelCall

# The most of a JSON answer a session call's stream gathers to read (beyond it: no history, no
# usage from the body; the answer itself passes unchanged, unless it is translated).
MAX_GATHERED = 16 * 1024 * 1024


class SessionAnswer:
    """The reading of one session call's 200 on its request's stream (see the module docstring)."""

    __slots__ = ("gathered", "size", "unmarked")

    def __init__(self, reader: ResponseReader) -> None:
        # A JSON answer's chunks so far (None: a stream, read frame by frame by the reader).
        self.gathered: list[bytes] | None = [] if reader.stream is None else None
        self.size = 0
        self.unmarked = True  # the access log has not been told yet that this stream accounts

    def body(self, reader: ResponseReader | None, chunk: bytes, end_of_stream: bool) -> bytes:
        """The client's bytes for one chunk of the answer."""
        if reader is None:
            return chunk
        if self.gathered is None:
            return reader.body(chunk, end_of_stream)
        rewrite = reader.needed
        if self.size + len(chunk) > MAX_GATHERED:
            # Too large to read whole: the call accounts without usage (the charge rule's cut
            # short). A translated answer's earlier chunks were held: it cannot be completed.
            self.gathered = None
            return b"" if rewrite else chunk
        if not end_of_stream:
            self.gathered.append(chunk)
            self.size += len(chunk)
            return b"" if rewrite else chunk
        whole = b"".join([*self.gathered, chunk]) if self.gathered else chunk
        self.gathered = None
        out = reader.body(whole, True)
        return out if rewrite else chunk

    def mark(self, reply: Reply) -> Reply:
        """``reply``, telling the access log (on the answer's first reply) that this stream
        accounts for the request, so its entry does not settle it again."""
        if not self.unmarked or isinstance(reply, Respond):
            return reply
        self.unmarked = False
        out = Continue() if reply is PASS else reply
        out.dynamic_metadata = {**(out.dynamic_metadata or {}), SETTLE_NAMESPACE: {"handled": "1"}}
        return out


def start(call: ModelCall, status: int, cluster: str) -> SessionAnswer | None:
    """The answer of ``call`` is about to come on its stream, with ``status`` from ``cluster``:
    a ``SessionAnswer`` when this stream reads it to its end and accounts for it, else None."""
    binding = call.binding
    call.status = status
    entry = call.services.current.backends.get(cluster)
    if binding is None or entry is None or entry[0].key != binding.key:
        return None  # not one of this binding's backends: the access log settles it
    call.backend = entry[1].id
    if status != 200:
        call.access.settled_elsewhere(call)
        return None
    call.answered = True  # Envoy's own replies are never a 200 on a binding's route
    # The first backend's answer comes in its own API; a fallback attempt's filter has already
    # translated its answer into the client's.
    direct = binding.primary is not None and binding.primary.id == entry[1].id
    reader = ResponseReader(entry[1].api if direct else call.api, call.api, binding.model, include_usage=call.client_wants_usage, observe=True)
    # The content type was skipped with the headers: a stream is what the client asked for.
    reader.start(status, "text/event-stream" if call.streamed() else "application/json")
    call.reader = reader
    call.finished = False  # this stream accounts at the answer's end, or when it is cut
    return SessionAnswer(reader)
