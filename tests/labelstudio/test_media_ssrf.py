"""Server-side request forgery: image URLs may not reach loopback, private, link-local or metadata addresses (after
DNS resolution, on every redirect) unless allowed; client-facing errors do not tell a closed port from an HTTP
status. Names are resolved by a fake ``socket.getaddrinfo``, and any connection to an address other than 127.0.0.1
fails the test, so nothing outside this machine is ever contacted."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

import pytest

from backend.labelstudio.media import MediaError, MediaFetcher
from tests.fakes import LABEL_CONFIG, make_config, png_bytes, task
from tests.local_http import LocalServer, closed_port, redirect, send_bytes

pytestmark = pytest.mark.reliability

AREA = "Media and server-side request forgery"
PNG = png_bytes(8, 6)


@pytest.fixture(autouse=True)
def only_loopback(monkeypatch):
    """Fake DNS for the names below; record (and refuse) every connection to anything but 127.0.0.1."""
    fake_dns = {"metadata.example": ["169.254.169.254"], "intranet.example": ["10.0.0.1"],
                "mixed.example": ["93.184.216.34", "10.0.0.1"], "mapped.example": ["::ffff:127.0.0.1"]}
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    attempts = []

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if host in fake_dns:
            out = []
            for ip in fake_dns[host]:
                fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
                sa = (ip, port or 80, 0, 0) if fam == socket.AF_INET6 else (ip, port or 80)
                out.append((fam, socket.SOCK_STREAM, 6, "", sa))
            return out
        if host not in ("127.0.0.1", "localhost"):
            raise socket.gaierror(socket.EAI_NONAME, "not resolved in tests")
        return real_getaddrinfo(host, port, family, type, proto, flags)

    def connect(sock, address):
        attempts.append(address)
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(111, "the tests only connect to 127.0.0.1")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def fetcher(tmp_path, **env):
    env.setdefault("LABEL_STUDIO_URL", "http://ls.test:8080")
    return MediaFetcher(make_config(tmp_path, **env))


def test_loopback_url_is_refused_by_default(tmp_path, reliability):
    with LocalServer({"/a.png": lambda h: send_bytes(h, PNG)}) as srv:
        with pytest.raises(MediaError) as ei:
            fetcher(tmp_path).load_image(srv.url("/a.png"), task_id=7)
        assert srv.hits == []
    assert str(ei.value) == "cannot download the image of task 7"
    reliability(AREA, "an image URL on 127.0.0.1", "task image http://127.0.0.1:<port>/a.png",
                f"'{ei.value}', no request reaches the server")


@pytest.mark.parametrize("setting", ["true", "127.0.0.0/8, 10.1.0.0/16"])
def test_loopback_url_is_allowed_by_the_setting(tmp_path, setting, reliability):
    with LocalServer({"/a.png": lambda h: send_bytes(h, PNG)}) as srv:
        img = fetcher(tmp_path, MEDIA_ALLOW_PRIVATE_NETWORKS=setting).load_image(srv.url("/a.png"))
    assert img.shape == (6, 8, 3)
    reliability(AREA, "an image URL on 127.0.0.1, allowed", f"MEDIA_ALLOW_PRIVATE_NETWORKS={setting}",
                "downloaded")


def test_networks_outside_the_list_stay_refused(tmp_path, reliability):
    with LocalServer({"/a.png": lambda h: send_bytes(h, PNG)}) as srv:
        with pytest.raises(MediaError) as ei:
            fetcher(tmp_path, MEDIA_ALLOW_PRIVATE_NETWORKS="10.0.0.0/8").load_image(srv.url("/a.png"), task_id=7)
        assert srv.hits == []
    reliability(AREA, "an image URL on 127.0.0.1 with another network allowed",
                "MEDIA_ALLOW_PRIVATE_NETWORKS=10.0.0.0/8", f"'{ei.value}', no request reaches the server")


@pytest.mark.parametrize("name,setting", [("metadata.example", "false"), ("intranet.example", "false"),
                                          ("mixed.example", "false"), ("mapped.example", "false"),
                                          ("metadata.example", "true")])
def test_names_resolving_to_private_addresses_are_refused(tmp_path, only_loopback, name, setting, reliability):
    f = fetcher(tmp_path, MEDIA_ALLOW_PRIVATE_NETWORKS=setting)
    with pytest.raises(MediaError) as ei:
        f.load_image(f"http://{name}/latest/meta-data/", task_id=7)
    assert only_loopback == []                         # refused before any connection
    assert str(ei.value) == "cannot download the image of task 7"
    reliability(AREA, f"a public-looking name resolving to a private address ({name})",
                f"task image http://{name}/latest/meta-data/, MEDIA_ALLOW_PRIVATE_NETWORKS={setting}",
                f"'{ei.value}', no connection attempted")


def test_redirect_to_loopback_is_refused(tmp_path, reliability):
    with LocalServer({"/secret.png": lambda h: send_bytes(h, PNG)}) as inner:
        with LocalServer({"/data/upload/1/a.png": redirect(inner.url("/secret.png")),
                          "/storage-data/uploaded/": redirect(inner.url("/secret.png"))}) as ls:
            f = fetcher(tmp_path, LABEL_STUDIO_URL=ls.origin)      # the LS host itself is allowed on 127.0.0.1
            with pytest.raises(MediaError) as ei:
                f.load_image("/data/upload/1/a.png", task_id=7)
            assert ls.hits and inner.hits == []
    reliability(AREA, "Label Studio's URL redirecting to another loopback port",
                "LABEL_STUDIO_URL on 127.0.0.1 answering 302 -> http://127.0.0.1:<other port>/secret.png",
                f"'{ei.value}', the redirect target is never contacted")


def test_configured_label_studio_host_is_allowed_when_private(tmp_path, reliability):
    with LocalServer({"/storage-data/uploaded/": lambda h: send_bytes(h, PNG)}) as ls:
        f = fetcher(tmp_path, LABEL_STUDIO_URL=ls.origin)
        assert f.load_image("/data/upload/1/a.png").shape == (6, 8, 3)
        assert ls.hits[0][1]["Authorization"].startswith("Token ")
    reliability(AREA, "LABEL_STUDIO_URL on 127.0.0.1", "an upload /data/upload/1/a.png, default settings",
                "downloaded from LS with the token (the LS host is allowed though private)")


def test_setup_host_is_allowed_when_nothing_is_configured(tmp_path, only_loopback, reliability):
    with LocalServer({"/storage-data/uploaded/": lambda h: send_bytes(h, PNG)}) as ls:
        f = fetcher(tmp_path, LABEL_STUDIO_URL=None, LABEL_STUDIO_API_KEY=None)
        f.set_connection(ls.origin, "setup-token")
        assert f.load_image("/data/upload/1/a.png").shape == (6, 8, 3)
        other = closed_port()
        with pytest.raises(MediaError):                          # its origin only, not other ports
            f.load_image(f"http://127.0.0.1:{other}/a.png")
    assert ("127.0.0.1", other) not in only_loopback
    reliability(AREA, "nothing configured, /setup names a host on 127.0.0.1",
                "/setup hostname=http://127.0.0.1:<port>, an upload, then an image on another port of 127.0.0.1",
                "the upload is downloaded from that origin; the other port is refused without connecting")


def test_redirect_to_another_scheme_is_refused(tmp_path, reliability):
    with LocalServer({"/a.png": redirect("file:///etc/passwd")}) as srv:
        with pytest.raises(MediaError) as ei:
            fetcher(tmp_path, MEDIA_ALLOW_PRIVATE_NETWORKS="true").fetch(srv.url("/a.png"), task_id=7)
    assert not [n for n in os.listdir(tmp_path / "model_dir" / "media-cache") if not n.startswith(".")]
    reliability(AREA, "a redirect to file:///etc/passwd", "an image URL answering 302 Location: file:///etc/passwd",
                f"'{ei.value}', nothing read or cached")


def test_redirect_loops_are_bounded(tmp_path, reliability):
    with LocalServer({}) as srv:
        srv.routes["/loop"] = redirect(srv.url("/loop"))
        with pytest.raises(MediaError) as ei:
            fetcher(tmp_path, MEDIA_ALLOW_PRIVATE_NETWORKS="true").fetch(srv.url("/loop"), task_id=7)
        assert len(srv.hits) == 6                              # the first request and 5 redirects
    reliability(AREA, "a redirect loop", "an image URL redirecting to itself", f"'{ei.value}' after 6 requests")


def test_closed_port_and_404_look_the_same_to_clients(tmp_path, caplog, reliability):
    caplog.set_level(logging.WARNING, logger="backend.labelstudio")
    messages = {}
    with LocalServer({}) as srv:
        for setting in ("false", "true"):
            f = fetcher(tmp_path, MEDIA_ALLOW_PRIVATE_NETWORKS=setting)
            for case, url in (("closed port", f"http://127.0.0.1:{closed_port()}/a.png"),
                              ("HTTP 404", srv.url("/missing.png"))):
                with pytest.raises(MediaError) as ei:
                    f.load_image(url, task_id=7)
                messages[(setting, case)] = str(ei.value)
    assert set(messages.values()) == {"cannot download the image of task 7"}
    logged = caplog.text
    assert "HTTP 404 from http://127.0.0.1" in logged               # the precise reasons are in the log
    assert "Connection refused" in logged and "not a public address" in logged
    reliability(AREA, "probing ports through image URLs",
                "task image on a closed port and on a path answering 404, with and without "
                "MEDIA_ALLOW_PRIVATE_NETWORKS", "the same client-facing message for all: "
                "'cannot download the image of task 7'; the log names the host, address and status")


def test_predict_error_for_a_private_url_is_coarse(make_app, reliability):
    with LocalServer({"/a.png": lambda h: send_bytes(h, PNG)}) as srv:
        client = make_app().test_client()
        ctx = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                           "value": {"text": ["the thing"]}}]}
        r = client.post("/predict", json={"tasks": [task(7, srv.url("/a.png"))], "project": "1.1",
                                          "label_config": LABEL_CONFIG, "params": {"context": ctx}})
        assert srv.hits == []
    body = r.get_json()
    assert r.status_code == 200 and body["results"][0]["result"] == []
    assert body["message"] == "cannot download the image of task 7"
    reliability(AREA, "interactive /predict with an image URL on 127.0.0.1", "task image http://127.0.0.1:<port>/a.png",
                f"an empty result with message '{body['message']}'")


POLICY_CASES = [   # (address, MEDIA_ALLOW_PRIVATE_NETWORKS, allowed)
    ("93.184.216.34", False, True), ("2606:2800:220:1::1", False, True),
    ("127.0.0.1", False, False), ("0.0.0.0", False, False), ("10.1.2.3", False, False), ("100.64.0.1", False, False),
    ("224.0.0.1", False, False), ("::1", False, False), ("fe80::1", False, False), ("fd12::1", False, False),
    ("::ffff:10.0.0.1", False, False), ("2002:7f00:1::", False, False), ("64:ff9b::a00:1", False, False),
    ("127.0.0.1", True, True), ("10.1.2.3", True, True), ("169.254.169.254", True, False), ("fd00:ec2::254", True, False),
    ("169.254.169.254", ("169.254.0.0/16",), True), ("10.1.2.3", ("10.0.0.0/8",), True),
    ("192.168.1.1", ("10.0.0.0/8",), False), ("::ffff:10.0.0.1", ("10.0.0.0/8",), True),
]


def test_address_policy(reliability):
    from backend.labelstudio.download import AddressPolicy
    wrong = [(a, allow) for a, allow, allowed in POLICY_CASES
             if AddressPolicy(allow_private=allow).allows(ipaddress.ip_address(a)) is not allowed]
    assert wrong == []
    refused = [a for a, allow, allowed in POLICY_CASES if allow is False and not allowed]
    reliability(AREA, "addresses a name may resolve to", "the address check, default setting, true, and CIDR lists",
                f"refused by default: {', '.join(refused)}; with true the metadata endpoints 169.254.169.254 and "
                f"fd00:ec2::254 stay refused unless their network is listed")
