"""Edit a serialized SentencePiece ModelProto: mark pieces UNUSED so text can never produce them.

SentencePiece's C++ `SetVocabulary` does this, but the Python binding does not expose it, and the
`sentencepiece_model_pb2` module needs protobuf, which is not a run-time dependency here. The edit
touches only `ModelProto.pieces[i].type` (field 1 -> field 3) and copies every other byte as is.
An UNUSED piece keeps its id, but the BPE encoder re-splits it into the pair it was merged from,
which is exactly the segmentation the text would get if the piece did not exist.
"""
from __future__ import annotations

_UNUSED = 5  # ModelProto.SentencePiece.Type.UNUSED


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes):
    """Yield (field_number, wire_type, raw_bytes_of_whole_field, payload) for each field of a message."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            payload = value
        elif wire == 1:
            payload, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            payload, i = buf[i:i + n], i + n
        elif wire == 5:
            payload, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, buf[start:i], payload


def _piece_text(piece_msg: bytes) -> str | None:
    for field, wire, _, payload in _fields(piece_msg):
        if field == 1 and wire == 2:
            return payload.decode("utf-8")
    return None


def mark_unused(model_proto: bytes, pieces: set[str]) -> bytes:
    """Return `model_proto` with every piece whose text is in `pieces` typed UNUSED."""
    out = bytearray()
    for field, wire, raw, payload in _fields(model_proto):
        if field == 1 and wire == 2 and _piece_text(payload) in pieces:
            body = b"".join(r for f, _, r, _ in _fields(payload) if f != 3) + b"\x18" + _encode_varint(_UNUSED)
            out += b"\x0a" + _encode_varint(len(body)) + body
        else:
            out += raw
    return bytes(out)
