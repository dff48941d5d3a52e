"""A minimal PNG writer (8-bit RGB, no dependencies) and a pixel canvas with a 5x7 bitmap font.

Used by the attention-mask picture (`mask_view`) and by the benchmark plots when matplotlib is
not installed (`codellama_rt.bench.plots`).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

RGB = tuple  # (r, g, b), each 0..255


def encode_png(width: int, height: int, rows: list) -> bytes:
    """PNG bytes of an 8-bit RGB image: `rows` holds `height` scanlines of 3 * `width` bytes each."""
    if width < 1 or height < 1 or len(rows) != height or any(len(r) != 3 * width for r in rows):
        raise ValueError(f"encode_png: expected {height} rows of {3 * width} bytes")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(r) for r in rows)  # filter type 0 per scanline
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_png(path, width: int, height: int, rows: list) -> Path:
    """Write `encode_png(width, height, rows)` to `path`; returns it as a Path."""
    path = Path(path)
    path.write_bytes(encode_png(width, height, rows))
    return path


# ---- canvas and font ---------------------------------------------------------------------------

# 5x7 glyphs: seven rows of five bits (bit 4 = leftmost column), as two hex digits per row.
_FONT_HEX = {
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F", "3": "1F02040201110E",
    "4": "02060A121F0202", "5": "1F101E0101110E", "6": "0608101E11110E", "7": "1F010204080808",
    "8": "0E11110E11110E", "9": "0E11110F01020C",
    "A": "0E11111F111111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1C12111111121C",
    "E": "1F10101E10101F", "F": "1F10101E101010", "G": "0E11101711110F", "H": "1111111F111111",
    "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211", "L": "1010101010101F",
    "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E", "P": "1E11111E101010",
    "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E", "T": "1F040404040404",
    "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A", "X": "11110A040A1111",
    "Y": "11110A04040404", "Z": "1F01020408101F",
    " ": "00000000000000", ".": "00000000000C0C", ",": "000000000C0408", "-": "0000001F000000",
    "/": "00010204081000", "%": "18190204081303", ":": "000C0C000C0C00", "(": "02040808080402",
    ")": "08040202020408", "+": "0004041F040400", "=": "00001F001F0000", "_": "0000000000001F",
    "<": "02040810080402", ">": "08040201020408", "?": "0E110102040004", "[": "0E08080808080E",
    "]": "0E02020202020E", "#": "0A0A1F0A1F0A0A", "*": "0004150E150400", "|": "04040404040404",
    "'": "04040800000000", "!": "04040404040004",
}
FONT = {c: [int(h[2 * i:2 * i + 2], 16) for i in range(7)] for c, h in _FONT_HEX.items()}
GLYPH_W, GLYPH_H = 5, 7


class Canvas:
    """An RGB pixel buffer with filled rectangles and upper-case bitmap text; `png()` encodes it."""

    def __init__(self, width: int, height: int, background: RGB = (255, 255, 255)):
        self.width, self.height = width, height
        self.px = bytearray(bytes(background) * (width * height))

    def rect(self, x: int, y: int, w: int, h: int, color: RGB) -> None:
        """Fill [x, x + w) x [y, y + h), clipped to the canvas."""
        x0, y0, x1, y1 = max(0, x), max(0, y), min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return
        line = bytes(color) * (x1 - x0)
        for row in range(y0, y1):
            start = 3 * (row * self.width + x0)
            self.px[start:start + len(line)] = line

    def text(self, x: int, y: int, s: str, color: RGB = (0, 0, 0), scale: int = 1) -> int:
        """Draw `s` (upper-cased; unknown characters as '?') with its top-left at (x, y); returns the
        x just past the text. Each glyph advances (GLYPH_W + 1) * scale pixels."""
        for ch in s.upper():
            rows = FONT.get(ch, FONT["?"])
            for r, bits in enumerate(rows):
                for c in range(GLYPH_W):
                    if bits >> (GLYPH_W - 1 - c) & 1:
                        self.rect(x + c * scale, y + r * scale, scale, scale, color)
            x += (GLYPH_W + 1) * scale
        return x

    @staticmethod
    def text_width(s: str, scale: int = 1) -> int:
        return len(s) * (GLYPH_W + 1) * scale

    def rows(self) -> list:
        w3 = 3 * self.width
        return [bytes(self.px[i * w3:(i + 1) * w3]) for i in range(self.height)]

    def png(self) -> bytes:
        return encode_png(self.width, self.height, self.rows())
