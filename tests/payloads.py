"""Hostile payloads built in memory for tests and bench/hostile.py: a .docx zip bomb, a tiny PDF
that costs minutes to parse, JSON that balloons when loaded, chat and multipart bodies streamed a
MB at a time, and compression bombs. Each returns bytes (or an iterator of byte blocks); callers
that need a file write it themselves. No pytest here: the bench imports this module too.
"""

from __future__ import annotations

import gzip
import io
import zipfile
import zlib
from collections.abc import Iterator

MB = 2**20


def docx_bomb(unpacked_mb: int) -> bytes:
    """A valid .docx whose document.xml is padded with `unpacked_mb` MB of blanks (legal between
    XML elements): about 1000x compressed, so 300 MB unpacked is a 300 kB file."""
    import docx

    buf = io.BytesIO()
    d = docx.Document()
    d.add_paragraph("Barn owls swallow mice whole.")
    d.save(buf)
    out = io.BytesIO()
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename != "word/document.xml":
                dst.writestr(info, data)
                continue
            head, tail = data.rsplit(b"</w:body>", 1)
            member_info = zipfile.ZipInfo("word/document.xml")
            # A fresh ZipInfo is ZIP_STORED whatever the archive's default: the bomb would be its full size.
            member_info.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(member_info, "w", force_zip64=True) as member:
                member.write(head)
                blank = b" " * MB
                for _ in range(unpacked_mb):
                    member.write(blank)
                member.write(b"</w:body>" + tail)
    return out.getvalue()


def slow_pdf(*, pages: int = 200, ops: int = 40_000) -> bytes:
    """A ~30 kB PDF whose pages all share one content stream of `ops` transform operators (and one
    word of text): each page costs pypdf about a second of CPU, the whole file minutes."""
    content = b"BT /F1 12 Tf 72 712 Td (owls) Tj\n" + b"1 0 0 1 0 0 cm\n" * ops + b"ET\n"
    stream = zlib.compress(content, 9)
    kids = b" ".join(b"%d 0 R" % (5 + i) for i in range(pages))
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents 4 0 R >>"
    objs += [page] * pages
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def hungry_json(values: int = 10_000_000) -> bytes:
    """30 MB of `{},` that json.loads turns into ten million dicts: about 750 MB of objects."""
    return b"[" + b"{}," * (values - 1) + b"{}]"


def padded_chat(total: int) -> Iterator[bytes]:
    """A valid JSON chat request of `total` bytes, a MB at a time (never held whole)."""
    head = b'{"model": "default", "messages": [{"role": "user", "content": "'
    tail = b'"}]}'
    yield head
    left, block = total - len(head) - len(tail), b"x" * MB
    while left > 0:
        yield block[: min(MB, left)]
        left -= MB
    yield tail


def multipart(name: str, size: int, boundary: str = "b0undary") -> tuple[bytes, bytes, int, str]:
    """(head, tail, total length, content type) of a one-file multipart body whose file `name` is
    `size` bytes: send the head, the file's bytes, then the tail."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: text/plain\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head, tail, len(head) + size + len(tail), f"multipart/form-data; boundary={boundary}"


def multipart_file(name: str, size: int, boundary: str = "b0undary") -> tuple[Iterator[bytes], int, str]:
    """(blocks, total length, content type) of a one-file multipart body whose file is `size` bytes,
    generated a MB at a time (never held whole)."""
    head, tail, total, content_type = multipart(name, size, boundary)

    def blocks() -> Iterator[bytes]:
        yield head
        left, block = size, b"y" * MB
        while left > 0:
            yield block[: min(MB, left)]
            left -= MB
        yield tail

    return blocks(), total, content_type


def compression_bombs(mb: int = 256) -> dict[str, bytes]:
    """`mb` MB of zeros, compressed a MB at a time (never held whole), in each form a server can send:
    "deflate-raw", "deflate-zlib" (both `Content-Encoding: deflate`), "gzip", and "gzip-gzip" (that
    gzip member gzipped again: a few hundred bytes on the wire, sent as `Content-Encoding: gzip, gzip`)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block, parts, crc, adler = bytes(MB), [], 0, 1
    for _ in range(mb):
        parts.append(c.compress(block))
        crc, adler = zlib.crc32(block, crc), zlib.adler32(block, adler)
    parts.append(c.flush())
    raw = b"".join(parts)
    size = (mb * MB) & 0xFFFFFFFF  # gzip's trailer holds the length modulo 2**32
    gz = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + raw + crc.to_bytes(4, "little") + size.to_bytes(4, "little")
    return {
        "deflate-raw": raw,
        "deflate-zlib": b"\x78\xda" + raw + adler.to_bytes(4, "big"),
        "gzip": gz,
        "gzip-gzip": gzip.compress(gz, compresslevel=9),
    }
