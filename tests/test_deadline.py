"""shared.deadline: the bound covers the name lookup and the connect too,
not only what is sent and read once connected.

A "dead" address on loopback: a listening socket with a backlog of 0 whose
one queue place is taken by a connection never accepted, so Linux drops
every further SYN and a connect to it waits in silence, like a host that is
down (a closed port would refuse at once, which no one waits for). The
fixture checks that it does stay silent. More than one address for a name:
``socket.getaddrinfo`` patched in-process for the test's own names."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests
from requests.adapters import HTTPAdapter

from functions.escalation.delivery import describe_failure
from loopback.servers import RecordingServer
from loopback.trickle import OneAnswer
from shared import deadline, deadline_core


@pytest.fixture
def dead_port():
    """A loopback port a connect to waits on, unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = []
    for _ in range(8):
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            probe.close()
            break
        held.append(probe)
    else:
        pytest.skip("this kernel answers a full listen queue: no silent address on loopback")
    yield port
    for sock in held:
        sock.close()
    listener.close()


@pytest.fixture
def silent_port():
    """A port that accepts the TCP connection and never says a word (a TLS
    handshake to it stalls)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def names(monkeypatch):
    """The test's own host names: a name maps to a list of loopback ports
    (its addresses, in order) or to a callable standing in for the lookup."""
    table: dict = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if host not in table:
            return real(host, port, family, type, proto, flags)
        entry = table[host]
        if callable(entry):
            return entry(host, port)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", p)) for p in entry]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


@pytest.fixture
def receiver():
    server = RecordingServer().start()
    yield server
    server.stop()


def pools(adapter: HTTPAdapter) -> list:
    """The connection pools an adapter has sent through."""
    return [adapter.poolmanager.pools[key] for key in adapter.poolmanager.pools.keys()]


def timed(call):
    start = time.monotonic()
    try:
        return call(), time.monotonic() - start
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc, time.monotonic() - start


def test_a_dead_first_address_still_delivers_within_the_bound(names, dead_port, receiver):
    names["two.test"] = [dead_port, receiver.port]
    result, took = timed(lambda: deadline.request(deadline.bounded(requests.Session()), "POST", f"http://two.test:{receiver.port}/x", 3.0,
                                                  data=b"{}"))
    # Waiting out the dead address would spend the whole bound and fail.
    assert isinstance(result, requests.Response), describe_failure(result, 3.0)
    assert result.status_code == 202 and took < 2.0
    assert len(receiver.received()) == 1


def test_three_dead_addresses_before_a_working_one_still_deliver_within_the_bound(names, dead_port, receiver):
    names["four.test"] = [dead_port, dead_port, dead_port, receiver.port]
    result, took = timed(lambda: deadline.request(deadline.bounded(requests.Session()), "POST", f"http://four.test:{receiver.port}/x", 4.0,
                                                  data=b"{}"))
    assert isinstance(result, requests.Response), describe_failure(result, 4.0)
    assert result.status_code == 202 and took < 3.0


def test_addresses_that_all_stay_silent_fail_at_the_bound_not_one_bound_each(names, dead_port):
    names["dead.test"] = [dead_port, dead_port, dead_port]
    result, took = timed(lambda: deadline.request(deadline.bounded(requests.Session()), "POST", "http://dead.test/x", 1.0, data=b"{}"))
    assert isinstance(result, requests.ConnectTimeout), result
    assert 0.9 < took < 2.5  # one bound each would be 3 s
    assert describe_failure(result, 1.0) == "ConnectTimeout: no connection within 1s"


def test_a_tls_handshake_gets_only_what_the_connect_left_of_the_bound(names, dead_port, silent_port, monkeypatch):
    # The dead address takes its share of the bound (a whole second here, so
    # that a handshake given a whole bound of its own, 2.5 s in all, stands
    # apart from one given what is left, 1.5 s, on a busy machine too).
    monkeypatch.setattr(deadline_core, "CONNECT_STAGGER_SECONDS", 1.0)
    names["tls.test"] = [dead_port, silent_port]
    result, took = timed(lambda: deadline.request(deadline.bounded(requests.Session()), "POST", f"https://tls.test:{silent_port}/x", 1.5,
                                                  data=b"{}", verify=False))
    assert isinstance(result, requests.Timeout), result
    assert took < 2.1


def test_a_slow_lookup_leaves_the_tls_handshake_only_the_rest_of_the_bound(names, silent_port):
    def slow(host, port):
        time.sleep(1.2)  # of a 1.5 s bound: a whole bound for the handshake would make it 2.7 s
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", silent_port))]

    names["slowtls.test"] = slow
    result, took = timed(lambda: deadline.request(deadline.bounded(requests.Session()), "GET", f"https://slowtls.test:{silent_port}/", 1.5,
                                                  verify=False))
    assert isinstance(result, requests.Timeout), result
    assert took < 2.2


def test_a_stalled_name_lookup_ends_at_the_bound(names):
    released = threading.Event()

    def stalled(host, port):
        released.wait(5)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    names["stalled.test"] = stalled
    try:
        result, took = timed(lambda: deadline.request(deadline.bounded(requests.Session()), "GET", "http://stalled.test/", 1.0))
    finally:
        released.set()
    assert isinstance(result, requests.ConnectTimeout), result
    assert 0.9 < took < 3.0  # the lookup itself stalls 5 s
    assert describe_failure(result, 1.0) == "ConnectTimeout: no connection within 1s"


def test_a_lookup_that_fails_is_still_named_as_one(names):
    def unknown(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    names["nowhere.test"] = unknown
    result, _ = timed(lambda: deadline.request(deadline.bounded(requests.Session()), "GET", "http://nowhere.test/", 1.0))
    assert isinstance(result, requests.ConnectionError), result
    assert describe_failure(result, 1.0) == "ConnectionError: the host name did not resolve"


def test_a_refused_first_address_moves_on_to_the_next_at_once(names, receiver, monkeypatch):
    # A stagger of 5 s: moving on only after it would be plain to see.
    monkeypatch.setattr(deadline_core, "CONNECT_STAGGER_SECONDS", 5.0)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    names["refused.test"] = [refused_port, receiver.port]
    result, took = timed(lambda: deadline.request(deadline.bounded(requests.Session()), "GET", f"http://refused.test:{receiver.port}/", 8.0))
    assert isinstance(result, requests.Response), result
    assert result.status_code == 202 and took < 2.0


def test_a_read_waits_what_is_left_of_the_bound_whatever_the_sockets_timeout():
    # The per-read wait comes from the bound alone: a socket left with a
    # short timeout (by an earlier exchange on a kept-alive connection, say)
    # must not make a read give up long before the bound.
    ours, theirs = socket.socketpair()
    try:
        ours.settimeout(0.01)
        bound = deadline._Bound(time.monotonic() + 2.0, 2.0)
        reader = deadline._BoundedSocketReader(ours.makefile("rb").detach(), ours, bound)
        answer = threading.Timer(0.2, theirs.sendall, (b"x",))
        answer.start()
        buffer = bytearray(4)
        assert reader.readinto(buffer) == 1 and buffer[:1] == b"x"
    finally:
        answer.join()
        ours.close()
        theirs.close()


def test_a_kept_alive_connection_serves_exchange_after_exchange(receiver):
    # The first answer comes late, so its reads wait less than the bound;
    # the connection is kept and every later exchange on it succeeds.
    def late_then_quick(recorded):
        time.sleep(0.6 if recorded.path == "/late" else 0.2)
        return 200, {}, b"{}"

    receiver.responder = late_then_quick
    http = deadline.bounded(requests.Session())
    for path in ("/late", "/1", "/2", "/3"):
        response = deadline.request(http, "GET", receiver.url + path, 1.0)
        assert response.status_code == 200 and response.content == b"{}"
    assert [pool.num_connections for pool in pools(http.get_adapter(receiver.url))] == [1]


def test_a_bounded_session_sends_through_the_bounded_adapter(receiver):
    http = deadline.bounded(requests.Session())
    assert deadline.request(http, "GET", receiver.url + "/", 1.0).status_code == 202
    adapter = http.get_adapter(receiver.url)
    assert isinstance(adapter, deadline.DeadlineAdapter)
    (pool,) = pools(adapter)
    assert issubclass(pool.ConnectionCls, deadline._BoundedConnection)
    assert pool.num_connections == 1


def test_an_adapter_mounted_closer_to_the_url_is_refused_not_sent_through_unbounded(receiver):
    # requests picks the adapter with the longest matching prefix: one
    # mounted for this very host would carry the exchange without the bound.
    http = deadline.bounded(requests.Session())
    http.mount(receiver.url, HTTPAdapter())
    with pytest.raises(TypeError, match="bound"):
        deadline.request(http, "GET", receiver.url + "/", 1.0)
    assert receiver.received() == []


def test_a_name_whose_lookup_stalls_does_not_hold_up_the_lookups_of_others(names, receiver):
    # Every attempt at a channel whose DNS stalls looks its name up again;
    # the page channel's lookup must not queue behind all of them.
    released = threading.Event()

    def stalled(host, port):
        released.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    names["stalled.test"] = stalled
    names["good.test"] = [receiver.port]
    callers = [threading.Thread(target=timed, args=(lambda: deadline.request(deadline.bounded(requests.Session()), "GET", "http://stalled.test/",
                                                                             0.3),))
               for _ in range(3 * deadline.RESOLVER_THREADS)]
    try:
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        result, took = timed(lambda: deadline.request(deadline.bounded(requests.Session()), "GET", f"http://good.test:{receiver.port}/", 1.0))
    finally:
        released.set()
    assert isinstance(result, requests.Response), describe_failure(result, 1.0)
    assert result.status_code == 202


def test_lookups_stalled_on_more_names_than_the_old_eight_threads_do_not_hold_up_another_name(monkeypatch):
    # Each stalled name holds one resolver thread until the system resolver
    # gives up: nine of them must not leave a tenth name waiting its bound.
    released = threading.Event()

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if host.startswith("stalled"):
            released.wait(10)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    resolver = deadline._Resolver(deadline.RESOLVER_THREADS)
    try:
        stalled = [resolver.submit(f"stalled{n}.test", 80, socket.AF_INET) for n in range(9)]
        time.sleep(0.1)
        answer = resolver.submit("good.test", 80, socket.AF_INET).result(timeout=1.0)
    finally:
        released.set()
    assert answer[0][4] == ("127.0.0.1", 80)
    for future in stalled:
        with pytest.raises(socket.gaierror):
            future.result(timeout=5)


def test_a_lookup_whose_thread_cannot_start_fails_at_once_and_the_next_one_is_looked_up(monkeypatch):
    resolver = deadline._Resolver(deadline.RESOLVER_THREADS)
    real_start = threading.Thread.start

    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    future = resolver.submit("localhost", 80, socket.AF_INET)
    assert future.done()
    with pytest.raises(OSError):
        future.result(timeout=0)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    again = resolver.submit("localhost", 80, socket.AF_INET)
    assert again is not future
    assert again.result(timeout=5)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_socks_proxy_is_refused_not_bypassed(receiver, scheme):
    # The bounded connect goes straight to the target: through a SOCKS
    # proxy's connection class it would skip the proxy without a word.
    pytest.importorskip("socks")
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        http = deadline.bounded(requests.Session())
        http.proxies = {scheme: f"socks5://127.0.0.1:{silent.getsockname()[1]}"}
        with pytest.raises(TypeError, match="SOCKS"):
            deadline.request(http, "GET", f"{scheme}://127.0.0.1:{receiver.port}/", 1.0)
    finally:
        silent.close()
    assert receiver.received() == []


def test_the_address_families_take_turns_in_getaddrinfos_order():
    # Three dead IPv6 addresses first must not cost three staggers before the
    # IPv4 one is tried.
    v6 = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (f"2001:db8::{n}", 443, 0, 0)) for n in (1, 2, 3)]
    v4 = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"192.0.2.{n}", 443)) for n in (1, 2)]
    assert deadline._interleaved(v6 + v4) == [v6[0], v4[0], v6[1], v4[1], v6[2]]
    assert deadline._interleaved(v4 + v6) == [v4[0], v6[0], v4[1], v6[1], v6[2]]
    assert deadline._interleaved(v4) == v4 and deadline._interleaved([]) == []


def test_a_session_not_built_bounded_is_refused_not_mounted_behind_its_owners_back(receiver):
    # Mounting inside request() changed a session other threads may be
    # sending on; the sessions are made bounded where they are built.
    http = requests.Session()
    with pytest.raises(TypeError, match="bounded"):
        deadline.request(http, "GET", receiver.url + "/", 1.0)
    assert not isinstance(http.get_adapter(receiver.url), deadline.DeadlineAdapter)
    assert receiver.received() == []


def test_every_sender_builds_its_session_bounded():
    from local.broker import LocalBroker
    from shared.config import load_settings
    from shared.publisher import Publisher
    from shared.silences import AlertManager

    publisher = Publisher(load_settings({"DATABASE_URL": "postgresql://u@h/d", "K_SINK": "http://broker.test/ns/default"}))
    broker = LocalBroker({})
    try:
        sessions = {"publisher": publisher._session(), "silences": AlertManager("http://alertmanager.test").http,
                    "local broker": broker._session()}
    finally:
        broker.executor.shutdown()
    for who, http in sessions.items():
        for url in ("http://elsewhere.test/", "https://elsewhere.test/"):
            assert isinstance(http.get_adapter(url), deadline.DeadlineAdapter), who


LONG_LABEL = "a" * 64  # one over the 63 characters a DNS label may have


# Each of these was urllib3's LocationParseError (requests already refuses
# a port over 65535, another scheme or none with its own errors).
@pytest.mark.parametrize("url", [f"http://{LONG_LABEL}.example/", f"https://{LONG_LABEL}.example/", "http://hooks..example/",
                                 f"http://{LONG_LABEL}:8080/", "http://a..b/", f"http://hooks.{LONG_LABEL}/"])
def test_a_url_no_request_can_be_made_to_is_one_of_requests_errors(url):
    # urllib3 refuses a label over 63 characters with LocationParseError, a
    # ValueError and no RequestException: a sender catching those crashed.
    with deadline.bounded(requests.Session()) as http, pytest.raises(deadline.UNUSABLE_URL):
        deadline.request(http, "POST", url, 1.0, json={})


def test_a_host_name_only_the_tls_handshake_behind_a_proxy_encodes_is_one_of_requests_errors_too():
    # Through a proxy the target's name is first encoded (IDNA) for the TLS
    # handshake after the CONNECT: a bare UnicodeError there.
    proxy = socket.create_server(("127.0.0.1", 0))

    def tunnel():
        conn, _ = proxy.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            conn.recv(65536)

    thread = threading.Thread(target=tunnel, daemon=True)
    thread.start()
    try:
        with deadline.bounded(requests.Session()) as http:
            http.proxies = {"https": f"http://127.0.0.1:{proxy.getsockname()[1]}"}
            with pytest.raises(requests.exceptions.InvalidURL, match="UnicodeError"):
                deadline.request(http, "POST", f"https://{LONG_LABEL}.example/", 2.0, json={})
    finally:
        proxy.close()
        thread.join(5)


NOT_UTF8_REDIRECT = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /\xff\xfe\r\nContent-Length: 0\r\n\r\n"


def test_a_redirect_whose_location_is_not_utf8_is_the_answer_it_is_never_an_unusable_url():
    # requests decodes a redirect's Location even when it does not follow
    # it: the UnicodeDecodeError was taken for the URL's (InvalidURL), and
    # the outbox stopped draining, blaming K_SINK, for what a peer answered.
    # One session a request: the peer closes each connection after its
    # answer without saying so, and a pooled connection reused before its
    # close arrives is reset, which is not what this test is about.
    with OneAnswer(NOT_UTF8_REDIRECT) as peer:
        with deadline.bounded(requests.Session()) as http:
            response = deadline.request(http, "POST", peer.url + "/x", 2.0, 4096, partial_2xx=True, json={}, allow_redirects=False)
        assert response.status_code == 307
        with deadline.bounded(requests.Session()) as http, pytest.raises(deadline.UnusableAnswer) as raised:
            deadline.request(http, "GET", peer.url + "/x", 2.0, 4096, allow_redirects=True)
    assert not isinstance(raised.value, deadline.UNUSABLE_URL)
    assert deadline.answered(raised.value) and raised.value.response.status_code == 307


def test_an_unusable_proxy_url_names_the_proxy_setting():
    with deadline.bounded(requests.Session()) as http:
        http.proxies = {"http": "http://"}
        with pytest.raises(deadline.UNUSABLE_URL) as raised:
            deadline.request(http, "POST", "http://hooks.example/", 1.0, json={})
    assert deadline.unusable_setting(raised.value, "K_SINK") == "HTTP_PROXY/HTTPS_PROXY"
    assert deadline.unusable_setting(requests.exceptions.InvalidURL("x"), "K_SINK") == "K_SINK"


@pytest.mark.parametrize("charset", ["idna", "punycode", "no-such-charset"])
def test_an_answer_in_a_charset_that_cannot_be_decoded_is_read_as_utf8_never_an_error(charset):
    # requests' .text raises UnicodeError for idna (no replacement decoding)
    # and punycode: raised out of a sender after the receiver said 2xx.
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=" + charset.encode() + b"\r\nContent-Length: 13\r\n\r\n{\"ok\": true}\xff"
    with OneAnswer(answer) as peer, deadline.bounded(requests.Session()) as http:
        response = deadline.request(http, "POST", peer.url + "/x", 2.0, 4096, json={})
    assert deadline.answer_text(response) == '{"ok": true}\ufffd'
    with pytest.raises(ValueError):
        deadline.answer_json(response)  # not JSON with the \xff: requests' ValueError, not a UnicodeError
    response._content = b'{"ok": true}'
    assert deadline.answer_json(response) == {"ok": True}
