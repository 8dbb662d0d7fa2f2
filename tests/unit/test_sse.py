"""SSEParser framing and encode_event."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from extproc.sse import SSEEvent, SSEParser, encode_event

STREAM = (
    b"event: message_start\n"
    b'data: {"type":"message_start"}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"a":1}\n\n'
    b"event: multi\r\n"
    b"data: line one\r\n"
    b"data: line two\r\n\r\n"
    b"data: [DONE]\n\n"
)


def feed_in_pieces(stream: bytes, cuts: list[int]) -> tuple[list[SSEEvent], bytes]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    prev = 0
    for cut in [*sorted(cuts), len(stream)]:
        events += parser.feed(stream[prev:cut])
        prev = cut
    return events, parser.pending


class TestFraming:
    def test_a_whole_stream_yields_every_frame_in_order(self) -> None:
        events = SSEParser().feed(STREAM)
        assert [e.event for e in events] == ["message_start", "", "", "multi", ""]
        assert events[0].data == b'{"type":"message_start"}'
        assert events[2].data == b'{"a":1}'
        assert events[4].data == b"[DONE]"

    def test_multi_line_data_is_joined_with_newlines(self) -> None:
        events = SSEParser().feed(STREAM)
        assert events[3].data == b"line one\nline two"

    def test_comment_only_frames_come_back_with_empty_data(self) -> None:
        events = SSEParser().feed(STREAM)
        assert events[1].data == b""
        assert events[1].raw == b": keep-alive comment\n\n"

    def test_raw_is_the_exact_frame_so_frames_concatenate_back_to_the_input(self) -> None:
        events = SSEParser().feed(STREAM)
        assert b"".join(e.raw for e in events) == STREAM

    def test_crlf_frames_keep_their_carriage_returns_in_raw(self) -> None:
        (event,) = SSEParser().feed(b"data: x\r\n\r\n")
        assert event.data == b"x"
        assert event.raw == b"data: x\r\n\r\n"

    def test_a_field_without_a_space_after_the_colon_still_parses(self) -> None:
        (event,) = SSEParser().feed(b"event:ping\ndata:{}\n\n")
        assert (event.event, event.data) == ("ping", b"{}")

    def test_an_incomplete_frame_is_held_as_pending(self) -> None:
        parser = SSEParser()
        assert parser.feed(b'data: {"a":1}\n\ndata: {"b"') == [SSEEvent("", b'{"a":1}', b'data: {"a":1}\n\n')]
        assert parser.pending == b'data: {"b"'
        (event,) = parser.feed(b":2}\n\n")
        assert event.data == b'{"b":2}'
        assert parser.pending == b""

    def test_a_frame_ending_in_a_single_newline_waits_for_the_blank_line(self) -> None:
        parser = SSEParser()
        assert parser.feed(b"data: x\n") == []
        assert parser.feed(b"\n")[0].data == b"x"

    def test_a_crlf_terminator_split_after_the_second_carriage_return_waits(self) -> None:
        parser = SSEParser()
        assert parser.feed(b"data: x\r\n\r") == []
        assert parser.feed(b"\n")[0].raw == b"data: x\r\n\r\n"


class TestSplitting:
    def test_every_single_split_point_gives_the_same_events(self) -> None:
        whole = SSEParser().feed(STREAM)
        for i in range(len(STREAM) + 1):
            events, pending = feed_in_pieces(STREAM, [i])
            assert events == whole, i
            assert pending == b""

    def test_byte_by_byte_feeding_gives_the_same_events(self) -> None:
        events, _ = feed_in_pieces(STREAM, list(range(len(STREAM))))
        assert events == SSEParser().feed(STREAM)

    @given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
    def test_any_split_of_a_valid_stream_gives_the_same_events(self, cuts: list[int]) -> None:
        events, pending = feed_in_pieces(STREAM, cuts)
        assert events == SSEParser().feed(STREAM)
        assert pending == b""

    @given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=8))
    def test_frames_plus_pending_always_reproduce_arbitrary_input(self, data: bytes, cuts: list[int]) -> None:
        cuts = [c for c in cuts if c <= len(data)]
        events, pending = feed_in_pieces(data, cuts)
        assert b"".join(e.raw for e in events) + pending == data


class TestEncode:
    def test_plain_data_becomes_one_data_line(self) -> None:
        assert encode_event(b'{"a":1}') == b'data: {"a":1}\n\n'

    def test_an_event_name_comes_first(self) -> None:
        assert encode_event(b"{}", "ping") == b"event: ping\ndata: {}\n\n"

    def test_multi_line_data_round_trips_through_the_parser(self) -> None:
        raw = encode_event(b"a\nb", "x")
        assert raw == b"event: x\ndata: a\ndata: b\n\n"
        assert SSEParser().feed(raw) == [SSEEvent("x", b"a\nb", raw)]
