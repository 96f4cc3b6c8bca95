"""The one vocabulary of what happened to an input line: the manifest's ``status`` column.

Every stage, the manifest, the contact sheet, the summary and the tests use these names.
A status is data (a string in Parquet), so it is a ``str`` enum: ``Status.OK == "ok"``,
and it formats and hashes as its value. Whether a result is ok follows from its status.

    sources      invalid_url  duplicate
    download     http_4xx  http_5xx  http_error  timeout  connection_error  too_large
                 too_many_redirects  incomplete_body  empty_body  opted_out
                 robots_disallowed  hash_mismatch
    thumbnail    decode_error  truncated_image  too_many_pixels  unsupported_format
                 encode_error  too_small  bad_aspect_ratio
    writing      write_error
    flow         internal_error  batch_failed
    ok           ok
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """What happened to one input line."""

    __str__ = str.__str__  # "ok", not "Status.OK", wherever a status is written
    __format__ = str.__format__

    OK = "ok"
    # sources: decided before any fetch
    INVALID_URL = "invalid_url"  # not http(s), no host, too long, unparsable
    DUPLICATE = "duplicate"  # seen earlier in the run; path points at the first one's output
    # download
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    HTTP_ERROR = "http_error"  # any other non-2xx final status
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    TOO_LARGE = "too_large"  # body over max_bytes
    TOO_MANY_REDIRECTS = "too_many_redirects"
    INCOMPLETE_BODY = "incomplete_body"  # closed before Content-Length bytes arrived
    EMPTY_BODY = "empty_body"
    OPTED_OUT = "opted_out"  # X-Robots-Tag says noai/noindex/... to all agents or to us
    ROBOTS_DISALLOWED = "robots_disallowed"  # --respect-robots-txt: the host's robots.txt
    HASH_MISMATCH = "hash_mismatch"  # the body's sha256 is not the input's; nothing kept
    # thumbnail
    DECODE_ERROR = "decode_error"
    TRUNCATED_IMAGE = "truncated_image"
    TOO_MANY_PIXELS = "too_many_pixels"  # a decompression bomb
    UNSUPPORTED_FORMAT = "unsupported_format"  # an image format outside the allowed list
    ENCODE_ERROR = "encode_error"
    TOO_SMALL = "too_small"  # --min-size: the original's shorter side is below it
    BAD_ASPECT_RATIO = "bad_aspect_ratio"  # --max-aspect-ratio: longer / shorter side above it
    # writing the outputs
    WRITE_ERROR = "write_error"
    # the flow
    INTERNAL_ERROR = "internal_error"  # an unexpected exception while handling this URL
    BATCH_FAILED = "batch_failed"  # its batch's node failed every retry; the client wrote it

    @property
    def ok(self) -> bool:
        return self is Status.OK


SOURCE = frozenset({Status.INVALID_URL, Status.DUPLICATE})
DOWNLOAD = frozenset(
    {
        Status.HTTP_4XX,
        Status.HTTP_5XX,
        Status.HTTP_ERROR,
        Status.TIMEOUT,
        Status.CONNECTION_ERROR,
        Status.TOO_LARGE,
        Status.TOO_MANY_REDIRECTS,
        Status.INCOMPLETE_BODY,
        Status.EMPTY_BODY,
        Status.OPTED_OUT,
        Status.ROBOTS_DISALLOWED,
        Status.INVALID_URL,  # a redirect to an invalid URL
    }
)
THUMBNAIL = frozenset(
    {
        Status.DECODE_ERROR,
        Status.TRUNCATED_IMAGE,
        Status.TOO_MANY_PIXELS,
        Status.UNSUPPORTED_FORMAT,
        Status.ENCODE_ERROR,
        Status.TOO_SMALL,
        Status.BAD_ASPECT_RATIO,
    }
)
# Failures of the network rather than of the URL: many of them at once mean DNS or the
# machine's network is failing (or a host is banning us), not bad input.
NETWORK = frozenset({Status.CONNECTION_ERROR, Status.TIMEOUT})
FLOW = frozenset({Status.INTERNAL_ERROR, Status.BATCH_FAILED})
NOT_FETCHED = frozenset({Status.INVALID_URL, Status.DUPLICATE, Status.BATCH_FAILED})
