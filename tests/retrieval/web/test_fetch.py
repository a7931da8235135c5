"""Fetching and extraction against pages served on 127.0.0.1: time, size and type limits,
charsets, redirects checked hop by hop, PDF and plain text."""

from __future__ import annotations

import time

import pytest

from retrieval.web.errors import RefusedAddressError
from retrieval.web.extract import ExtractError, extract
from retrieval.web.fetch import FetchError, Limits, fetch
from retrieval.web.guard import Allowlist
from tests.retrieval.web.conftest import LocalWeb, pdf_bytes

LOCAL = Allowlist.parse("127.0.0.1/32")


def test_an_article_is_fetched_and_its_main_text_extracted(local_web, recording_client):
    page = fetch(f"{local_web}/article", recording_client, allow=LOCAL)
    text = extract(page)
    assert text.title == "Barn owls" and "swallow mice whole" in text.text
    assert "Copyright" not in text.text and "Home | About" not in text.text  # boilerplate gone


def test_a_page_that_never_answers_times_out(local_web, recording_client):
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out after 1 s"):
        fetch(f"{local_web}/slow", recording_client, allow=LOCAL, limits=Limits(page_timeout=1.0))
    assert time.monotonic() - start < 2.0


def test_huge_pages_are_cut_at_the_limit(local_web, recording_client):
    page = fetch(f"{local_web}/huge", recording_client, allow=LOCAL, limits=Limits(max_bytes=300_000))
    assert page.truncated and len(page.body) == 300_000


def test_wrong_content_types_are_refused_with_the_type(local_web, recording_client):
    with pytest.raises(FetchError, match="content type image/png is not one of"):
        fetch(f"{local_web}/image", recording_client, allow=LOCAL)


def test_declared_charsets_are_honoured_and_bad_ones_detected(local_web, recording_client):
    latin = extract(fetch(f"{local_web}/latin1", recording_client, allow=LOCAL))
    assert "Café crème brûlée" in latin.text
    bad = extract(fetch(f"{local_web}/badcharset", recording_client, allow=LOCAL))
    assert "Smørrebrød" in bad.text


@pytest.mark.parametrize(("target", "rule"), [
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.1/admin", "private"),
    ("http://[::1]/", "loopback"),  # the allowlist holds 127.0.0.1/32, not IPv6 loopback
    ("file:///etc/passwd", "scheme 'file'"),
])
def test_every_redirect_hop_is_checked(local_web, recording_client, target, rule):
    with pytest.raises(RefusedAddressError, match=rule):
        fetch(f"{local_web}/redirect?to={target}", recording_client, allow=LOCAL)
    assert recording_client.transport_record.connected == ["127.0.0.1"]  # only the first, allowed hop


def test_redirects_to_allowed_pages_are_followed(local_web, recording_client):
    page = fetch(f"{local_web}/redirect?to=/article", recording_client, allow=LOCAL)
    assert page.final_url == f"{local_web}/article" and b"Barn owls" in page.body


def test_pdf_and_plain_text_pages(local_web, recording_client):
    LocalWeb.pages["/paper.pdf"] = ("application/pdf", pdf_bytes("Tawny owls nest in tree holes and old crow nests."))
    LocalWeb.pages["/notes.txt"] = ("text/plain; charset=utf-8", "Little owls are active by day as well as at night.".encode())
    assert "Tawny owls nest in tree holes" in extract(fetch(f"{local_web}/paper.pdf", recording_client, allow=LOCAL)).text
    assert extract(fetch(f"{local_web}/notes.txt", recording_client, allow=LOCAL)).text.startswith("Little owls")
    LocalWeb.pages["/empty"] = ("text/html", b"<html><body><nav>menu</nav></body></html>")
    with pytest.raises(ExtractError, match="no main text"):
        extract(fetch(f"{local_web}/empty", recording_client, allow=LOCAL))
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(f"{local_web}/missing", recording_client, allow=LOCAL)
