"""The request-header limits, enforced where every protocol can still be answered.

Envoy's codecs stop a request whose headers exceed their limit, but only HTTP/1 gets an answer
(a 431); an HTTP/2 stream is reset with no response. So the codecs are set to a multiple of the
gateway's limits (``crdgol.replies``) and the limits themselves are checked here, on the first
message of every request, with a JSON 431 in the client API's shape.
"""

from __future__ import annotations

from collections.abc import Mapping

from crdgol.replies import MAX_REQUEST_HEADER_BYTES, MAX_REQUEST_HEADERS
from crdgol.request_path import HEADER_BYTES, HEADER_COUNT
from extproc.errors import HeadersTooLarge


def check_request_headers(headers: Mapping[str, str]) -> None:
    """Raise ``HeadersTooLarge`` if the headers exceed the gateway's size or count limit.

    Size counts names and values as Envoy does (pseudo-headers included). Repeated headers arrive
    merged, so the count can be lower than on the wire; Envoy's codec limit bounds that case.
    """
    # On the one-message path only a few headers are sent; Envoy counts and measures them all.
    counted = headers.get(HEADER_COUNT)
    count = int(counted) if counted is not None and counted.isdigit() else len(headers)
    if count > MAX_REQUEST_HEADERS:
        raise HeadersTooLarge(f"the request has {count} headers: at most {MAX_REQUEST_HEADERS} are accepted")
    sent = headers.get(HEADER_BYTES)
    size = int(sent) if sent is not None and sent.isdigit() else sum(len(k) + len(v) for k, v in headers.items())
    if size > MAX_REQUEST_HEADER_BYTES:
        raise HeadersTooLarge(
            f"the request headers are {size} bytes: at most {MAX_REQUEST_HEADER_BYTES // 1024} KiB are accepted"
        )
