"""Guarded downloads of task media: the ``requests.Session`` that ``MediaFetcher`` installs through the SDK's
``http_session`` hook, so that every download path of the SDK (uploads, the storage proxy and its legacy fallback,
presigned cloud URLs, plain URLs) goes through it.

- Addresses (server-side request forgery): each connection resolves its host itself, checks every address the name
  resolves to against :class:`AddressPolicy`, and connects to one of exactly those addresses. The address is pinned:
  a DNS answer that changes between the check and the connection (rebinding) cannot slip past. Redirects are
  followed here, at most ``max_redirects``, every hop through the same check, and the Authorization header is dropped
  when a redirect leaves the origin. Environment proxies are not used (they would connect instead of us).
- Size: the body is read in chunks and counted after content decoding, so a gzip bomb stops at ``max_bytes``; a
  Content-Length already over the bound is refused before reading.
- Time: one :class:`Deadline` per fetch, redirects, fallbacks and retries included. Every socket timeout is the time
  left, and a watchdog shuts the fetch's sockets down when the deadline passes, so a server dripping body bytes,
  header lines or TLS records cannot hold a download longer.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional, Union
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family

from backend.labelstudio.protocol import url_origin

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
CHUNK_BYTES = 64 * 1024
MAX_REDIRECTS = 5
# cloud instance-metadata endpoints (AWS/GCP/Azure/OpenStack, AWS ECS, AWS IPv6, Alibaba): never reachable through
# MEDIA_ALLOW_PRIVATE_NETWORKS=true, only by naming their network explicitly
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in
                               ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class DownloadError(Exception):
    """A download stopped by this module; ``url`` is the URL it was fetching."""

    def __init__(self, message: str, url: Optional[str] = None):
        super().__init__(message)
        self.url = url


class AddressRefused(DownloadError):
    """The target resolves to an address the policy does not allow."""


class TooManyRedirects(DownloadError):
    """More redirects than ``max_redirects``."""


class DownloadLimitExceeded(DownloadError):
    """A configured bound stopped the download; the message names the setting."""


class DownloadTooLarge(DownloadLimitExceeded):
    pass


class DownloadTimeout(DownloadLimitExceeded):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# addresses
# ---------------------------------------------------------------------------------------------------------------------
def embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, 6to4, NAT64), else the address itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def is_public(ip: IPAddress) -> bool:
    """A globally routable unicast address (not loopback, private, link-local, shared, reserved or multicast)."""
    ip = embedded_ipv4(ip)
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses downloads may connect to.

    ``trusted_origins`` (the Label Studio host) are reachable whatever their address; anything else must resolve only
    to public addresses, unless ``allow_private`` is True (every address but the cloud metadata endpoints) or a tuple
    of networks (``"10.0.0.0/8"``) the non-public addresses must lie in."""

    trusted_origins: frozenset = frozenset()
    allow_private: Union[bool, tuple] = False

    def __post_init__(self):
        if not isinstance(self.allow_private, bool):     # network strings -> network objects, once
            object.__setattr__(self, "allow_private", tuple(ipaddress.ip_network(str(n)) for n in self.allow_private))

    def allows(self, ip: IPAddress) -> bool:
        if is_public(ip):
            return True
        if self.allow_private is True:
            return embedded_ipv4(ip) not in METADATA_ADDRESSES
        return any(embedded_ipv4(ip) in net or ip in net for net in self.allow_private or ())

    def check(self, origin: Optional[str], host: str, addresses: list) -> None:
        """Raise :class:`AddressRefused` unless ``origin`` is trusted or every one of ``addresses`` is allowed."""
        if origin in self.trusted_origins:
            return
        refused = [str(ip) for ip in addresses if not self.allows(ip)]
        if refused:
            raise AddressRefused(f"{host} resolves to {', '.join(refused)}, not a public address (allowed only "
                                 f"through MEDIA_ALLOW_PRIVATE_NETWORKS)", origin)


# ---------------------------------------------------------------------------------------------------------------------
# time
# ---------------------------------------------------------------------------------------------------------------------
class Deadline:
    """The total time of one fetch. ``remaining()`` raises :class:`DownloadTimeout` once it has passed; sockets handed
    to ``watch`` are shut down by a timer thread at that moment (interrupting a read blocked in any layer)."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self._end = time.monotonic() + self.seconds
        self._lock = threading.Lock()
        self._sockets: list = []
        self._timer: Optional[threading.Timer] = None
        self._fired = False

    @property
    def passed(self) -> bool:
        return self._fired or time.monotonic() >= self._end

    def error(self, url: Optional[str] = None) -> DownloadTimeout:
        return DownloadTimeout(f"took longer than MEDIA_TIMEOUT_S ({self.seconds:g} s)", url)

    def remaining(self, url: Optional[str] = None) -> float:
        left = self._end - time.monotonic()
        if left <= 0 or self._fired:
            raise self.error(url)
        return left

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self._timer is None and not self._fired:
                self._timer = threading.Timer(max(0.0, self._end - time.monotonic()), self._fire)
                self._timer.daemon = True
                self._timer.start()
            fired = self._fired
        if fired:
            _shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def close(self) -> None:
        """Stop the timer (the fetch is over)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._sockets.clear()

    def __enter__(self) -> "Deadline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shutdown(sock: socket.socket) -> None:
    try:   # the plain socket call, also for TLS sockets: it wakes a reader blocked in another thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------------------------
# connections pinned to checked addresses
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Guard:
    policy: AddressPolicy
    deadline: Deadline


class _GuardedConnection:
    """Mixin for urllib3 connections: resolve, check every address, connect to a checked one, watch the socket."""

    scheme = "http"

    def __init__(self, *args, guard: _Guard, **kwargs):
        self._guard = guard
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        host = self._dns_host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, self.port, allowed_gai_family(), socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        netloc = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self._guard.policy.check(url_origin(f"{self.scheme}://{netloc}"), self.host, addresses)
        return self._connect_first(infos)

    def _connect_first(self, infos: list) -> socket.socket:
        """Connect to the first reachable address of ``infos`` (those just checked), like socket.create_connection."""
        error: Optional[OSError] = None
        for family, socktype, proto, _, sockaddr in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                if isinstance(self.timeout, (int, float)):
                    sock.settimeout(self.timeout)
                if self.source_address:
                    sock.bind(self.source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        if isinstance(error, socket.timeout):
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from error
        raise NewConnectionError(self, f"Failed to establish a new connection to {self.host}: {error}") from error

    def connect(self) -> None:
        super().connect()
        self._guard.deadline.watch(self.sock)


class _GuardedHTTPConnection(_GuardedConnection, HTTPConnection):
    scheme = "http"


class _GuardedHTTPSConnection(_GuardedConnection, HTTPSConnection):
    scheme = "https"


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, guard: _Guard):
        self._guard = guard                      # before super().__init__, which builds the pool manager
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": partial(_GuardedHTTPPool, guard=self._guard),
                                                   "https": partial(_GuardedHTTPSPool, guard=self._guard)}


# ---------------------------------------------------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------------------------------------------------
class GuardedSession(requests.Session):
    """Streams, follows redirects itself, counts decoded bytes and keeps to the deadline. Meant for one fetch: the
    session's connections are watched by that fetch's deadline, so close it afterwards (``with`` block)."""

    def __init__(self, policy: AddressPolicy, deadline: Deadline, max_bytes: int,
                 max_redirects: int = MAX_REDIRECTS):
        super().__init__()
        self.deadline, self.max_bytes, self.max_redirects = deadline, int(max_bytes), max_redirects
        adapter = _GuardedAdapter(_Guard(policy, deadline))
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings["proxies"] = {}                 # we connect to the checked address, never through a proxy
        return settings

    def request(self, method: str, url: str, **kwargs) -> requests.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        for key in ("allow_redirects", "stream", "timeout"):
            kwargs.pop(key, None)
        for _ in range(self.max_redirects + 1):
            response = self._request_once(method, url, headers, kwargs)
            if not response.is_redirect:
                return self._read_body(response)
            target = urljoin(response.url, self.get_redirect_target(response))
            response.close()
            if self.should_strip_auth(url, target):
                headers.pop("Authorization", None)
            if response.status_code == 303 and method != "HEAD":
                method = "GET"
            url = target
        raise TooManyRedirects(f"more than {self.max_redirects} redirects", url)

    def _request_once(self, method: str, url: str, headers: dict, kwargs: dict) -> requests.Response:
        left = self.deadline.remaining(url)
        try:
            response = super().request(method, url, headers=headers, allow_redirects=False, stream=True,
                                       timeout=(left, left), **kwargs)
        except requests.RequestException:
            if self.deadline.passed:
                raise self.deadline.error(url) from None
            raise
        except AddressRefused as exc:   # raised by the connection, which knows the host but not the URL
            exc.url = url
            raise
        if self.deadline.passed:        # the watchdog cut the headers short: what arrived is not a response
            response.close()
            raise self.deadline.error(url)
        return response

    def _read_body(self, response: requests.Response) -> requests.Response:
        """Read the body into ``response.content``, within ``max_bytes`` (decoded) and the deadline."""
        if response.status_code >= 400 or response.request.method == "HEAD":
            response._content = b""              # raise_for_status needs no body; never read an error page
            response.close()
            return response
        declared = response.headers.get("Content-Length", "")
        chunks, total = [], 0
        try:
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large(response.url)
            for chunk in response.iter_content(CHUNK_BYTES):
                total += len(chunk)
                if total > self.max_bytes:
                    raise self._too_large(response.url)
                chunks.append(chunk)
                self.deadline.remaining(response.url)
        except requests.RequestException:
            if self.deadline.passed:
                raise self.deadline.error(response.url) from None
            raise
        finally:
            response.close()
        if self.deadline.passed:        # the watchdog cut the body short
            raise self.deadline.error(response.url)
        response._content = b"".join(chunks)
        return response

    def _too_large(self, url: str) -> DownloadTooLarge:
        return DownloadTooLarge(f"is larger than MAX_DOWNLOAD_MB ({self.max_bytes / 2**20:g} MB)", url)


__all__ = ["AddressPolicy", "AddressRefused", "Deadline", "DownloadError", "DownloadLimitExceeded",
           "DownloadTimeout", "DownloadTooLarge", "GuardedSession", "TooManyRedirects", "is_public"]
