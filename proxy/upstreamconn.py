"""UpstreamConnection: one kept-alive connection to the upstream, which knows where each
answer ends, so that bytes past it never reach the next exchange (another client's)."""

from __future__ import annotations

from aiohttp.client_exceptions import ServerTimeoutError
from aiohttp.client_proto import ResponseHandler

from proxy.headers import RawHeaders

# Final statuses whose answer ends at its head, whatever its length says (RFC 9112 6.3).
_BODILESS = (b"204", b"304")
_EMPTY_LINE = (b"\r", b"\n")  # bytes llhttp skips before a status line


class UpstreamConnection(ResponseHandler):
    """aiohttp's client protocol, plus guards against an upstream saying too much.

    aiohttp's parser reads on past an answer's end, and keeps a next answer's head it has
    only begun to read for the next exchange on the connection: another client's. So:
    - bytes arriving while the connection sits idle in the pool (an upstream speaking out
      of turn) close it;
    - an answer to HEAD, a 204 and a 304 end with their head, whatever follows (RFC 9112
      6.3): a body sent anyway is dropped and the connection not reused, as nginx does,
      where aiohttp's parser would take it for a malformed next answer and fail this one
      with it (a 502);
    - a connection on which more came than the answer's head and Content-Length is not
      reused (overran()), as nginx closes one whose upstream "sent more data than
      specified". A chunked answer's connection gets a new parser instead (_send).
    Each exchange finds its final head's end (here, not in the parser) to count from it.
    """

    idle = False
    parser_for: bool | None = None  # whether its parser reads a HEAD's answers; None: none yet
    head_only = False  # a HEAD's answer is awaited
    in_head = False  # an answer's final head is awaited
    bodiless = False  # the final head ends the answer (HEAD, 204, 304)
    _head = b""  # its current head so far, already fed to the parser
    received = 0  # bytes of this exchange fed to the parser
    body_at = 0  # where in them the final answer's body begins
    # Forwarder's: its last answer's raw header fields, and what it made of them
    answer_fields: tuple[RawHeaders, tuple[bytes, bool]] | None = None

    def data_received(self, data: bytes) -> None:
        if self.idle:
            self.force_close()
            if self.transport is not None:
                self.transport.close()
            return
        if self.in_head:
            if self._head or self.head_only or not data.startswith(b"HTTP/"):
                data = self._through_head(data)
            else:  # the common case, inline (valgrind: ~1k instructions a request less)
                end = data.find(b"\r\n\r\n")
                status = data[9:12]  # "HTTP/1.1 200"
                if end < 0 or status[:1] == b"1" or status in _BODILESS:
                    data = self._through_head(data)
                else:
                    self.in_head = False
                    self.body_at = self.received + end + 4
        self.received += len(data)
        super().data_received(data)

    def overran(self, size: int | None) -> bool:
        """Whether more came than the answer, of `size` bytes of body (None: chunked, or
        ended by the close): the parser would take the rest for the next answer's start."""
        if self.in_head:
            return True
        extra = self.received - self.body_at
        if self.bodiless:
            return extra != 0
        return size is not None and extra != size

    def resume_reading(self, resume_parser: bool = True) -> None:
        """aiohttp's, when there is something to resume.

        The answer's StreamReader calls this after every read that leaves it under its
        low-water mark and again at the answer's end, paused or not: each call fed the
        parser an empty buffer and asked the transport to resume (valgrind, a
        pass-through with the access log on: 215.7k instructions a request before,
        207.4k after). Unpaused, there is nothing for either: the transport is reading,
        and with decompression off the parser keeps nothing back.
        """
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)

    def time_out(self) -> None:
        """The upstream said nothing within the read timeout: the waiting read raises."""
        self.set_exception(ServerTimeoutError("Timeout on reading data from socket"))

    def _through_head(self, data: bytes) -> bytes:
        """`data`, cut at the final head's end when the answer can have no body; notes
        where its body begins. Interim heads (103 Early Hints) are skipped, and so are
        the empty lines the parser skips before a status line."""
        seen = self._head
        buf = seen + data if seen else data
        start = 0
        while True:
            while buf[start : start + 1] in _EMPTY_LINE:
                start += 1
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                self._head = buf[start:]
                return data
            status = buf[start + 9 : start + 12]  # "HTTP/1.1 204"
            if status[:1] != b"1":
                break
            start = end + 4
        self.in_head = False
        self._head = b""
        cut = end + 4 - len(seen)
        self.body_at = self.received + cut
        self.bodiless = self.head_only or status in _BODILESS
        if not self.bodiless:
            return data
        if cut < len(data):
            self.force_close()  # the rest is a body this answer cannot have
        return data[:cut]
