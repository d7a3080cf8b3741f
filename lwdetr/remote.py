"""Images by http(s) URL, for `Detector.predict` (the transformers model page's examples open a URL).

Only `Detector` fetches URLs; `load_image` never does, so that no path handed to the CLI, the trainer or the app
can make the process reach a network address. A download is bounded in time (`timeout` per connect and read) and
size (the image byte cap of `lwdetr.images`, checked against Content-Length and again while reading), and every
failure is an `ImageLoadError` with a one-line message naming the URL.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import urlsplit

from . import images
from .images import ImageLoadError, source_name

__all__ = ["DEFAULT_TIMEOUT", "fetch_url", "is_url"]

DEFAULT_TIMEOUT = 10.0  # seconds per connection attempt and per read
_CHUNK = 1 << 20


def is_url(source: object) -> bool:
    """Whether `source` is a string naming an http or https URL (other schemes are paths, as before)."""
    return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))


def fetch_url(url: str, timeout: float = DEFAULT_TIMEOUT, max_bytes: int | None | str = "images") -> bytes:
    """The body of `url` (http or https only), at most `max_bytes` long: by default the image byte cap,
    `images.DEFAULT_MAX_IMAGE_BYTES`, read at each call.

    Raises:
        ImageLoadError: another scheme, no host, an HTTP error status, a network failure or timeout, or a body
            larger than `max_bytes`; one line naming the URL.
    """
    name = source_name(url)
    if max_bytes == "images":
        max_bytes = images.DEFAULT_MAX_IMAGE_BYTES
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ImageLoadError(f"{name}: only http and https URLs with a host can be downloaded")
    request = urllib.request.Request(url, headers={"User-Agent": "lwdetr", "Accept": "image/*"})
    try:
        with urllib.request.build_opener(_HttpOnlyRedirects).open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
                raise ImageLoadError(f"{name}: {int(length):,} bytes, more than the limit of {max_bytes:,}")
            return _read_bounded(response, name, max_bytes)
    except ImageLoadError:
        raise
    except urllib.error.HTTPError as error:
        raise ImageLoadError(f"{name}: the server answered HTTP {error.code} ({error.reason})") from None
    except urllib.error.URLError as error:
        raise ImageLoadError(f"{name}: cannot download ({_one_line(error.reason)}; offline?)") from None
    except (TimeoutError, OSError, ValueError) as error:
        raise ImageLoadError(f"{name}: cannot download ({_one_line(error)})") from None


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only (urllib's default also follows them to ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        if not is_url(newurl):
            raise ImageLoadError(f"{source_name(req.full_url)}: redirected to a non-http(s) URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _read_bounded(response, name: str, max_bytes: int | None) -> bytes:
    chunks, total = [], 0
    while chunk := response.read(_CHUNK):
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:
            raise ImageLoadError(f"{name}: more than the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _one_line(error: object) -> str:
    text = " ".join(str(error).split())
    return text[:200] if text else type(error).__name__
