"""The SSRF table: every refused address form, each refused with a reason naming its rule, and
no connection made; the allowlist; DNS pinning (the address checked is the one connected)."""

from __future__ import annotations

import pytest

from retrieval.web.errors import RefusedAddressError
from retrieval.web.fetch import fetch
from retrieval.web.guard import Allowlist, check

REFUSED = [
    ("http://127.0.0.1/", "loopback"),
    ("http://localhost/", "loopback"),
    ("http://2130706433/", "loopback"),  # decimal
    ("http://0177.0.0.1/", "loopback"),  # octal
    ("http://0x7f.0.0.1/", "loopback"),  # hex
    ("http://0x7f000001/", "loopback"),  # one hex number
    ("http://127.1/", "loopback"),  # short form
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "embedding 127.0.0.1"),  # IPv4-mapped IPv6
    ("http://[::ffff:7f00:1]/", "embedding 127.0.0.1"),
    ("http://[2002:7f00:1::]/", "embedding 127.0.0.1"),  # 6to4
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "embedding 127.0.0.1"),  # Teredo
    ("http://[64:ff9b::a9fe:a9fe]/", "embedding 169.254.169.254"),  # NAT64
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fd00::1]/", "private"),  # unique local
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
    ("http://[fe80::1]/", "link-local"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "broadcast"),
    ("http://user:secret@127.0.0.1:8080/", "loopback"),
    ("http://example.com@127.0.0.1/", "loopback"),  # userinfo that looks like a host
    ("file:///etc/passwd", "scheme 'file'"),
    ("ftp://example.com/", "scheme 'ftp'"),
    ("gopher://127.0.0.1:25/", "scheme 'gopher'"),
    ("http:///nohost", "no host"),
]


@pytest.mark.parametrize(("url", "rule"), REFUSED)
def test_refused_forms_say_why_and_are_never_fetched(url, rule, recording_client):
    with pytest.raises(RefusedAddressError, match=rule):
        check(url)
    with pytest.raises(RefusedAddressError, match=rule):
        fetch(url, recording_client)
    assert recording_client.transport_record.connected == []  # zero refused addresses fetched


def test_public_addresses_pass_and_the_allowlist_opens_hosts_and_networks():
    assert check("https://93.184.215.14/a?b=c").ip == "93.184.215.14"
    allow = Allowlist.parse("wiki.corp.example, 10.2.0.0/16, 127.0.0.1/32")
    assert check("http://10.2.3.4:8080/x", allow).port == 8080
    assert check("http://127.0.0.1/", allow).ip == "127.0.0.1"
    with pytest.raises(RefusedAddressError, match="private"):
        check("http://10.3.0.1/", allow)
    resolver = lambda host, port: ["10.9.9.9"]  # noqa: E731 -- a name on the intranet
    assert check("http://wiki.corp.example/page", allow, resolver=resolver).ip == "10.9.9.9"
    with pytest.raises(RefusedAddressError, match="wiki.other.example resolves to 10.9.9.9, a private address"):
        check("http://wiki.other.example/", allow, resolver=resolver)


def test_a_name_with_any_private_address_is_refused():
    resolver = lambda host, port: ["93.184.215.14", "127.0.0.1"]  # noqa: E731
    with pytest.raises(RefusedAddressError, match="resolves to 127.0.0.1"):
        check("http://mixed.example/", resolver=resolver)


def test_dns_answer_cannot_change_between_check_and_connect(local_web, recording_client):
    port = local_web.rsplit(":", 1)[1]
    answers = iter([["127.0.0.1"]] + [["169.254.169.254"]] * 10)  # a rebinding DNS server

    def resolver(host, p):
        return next(answers)

    page = fetch(f"http://rebind.test:{port}/article", recording_client, allow=Allowlist.parse("127.0.0.1/32"),
                 resolver=resolver)
    assert b"Barn owls" in page.body
    assert recording_client.transport_record.connected == ["127.0.0.1"]  # the checked address, not a new lookup
    from tests.retrieval.web.conftest import LocalWeb

    assert LocalWeb.hosts[-1] == f"rebind.test:{port}"  # the server still saw its own name
