"""Reading users' text files: encoding from the byte-order mark, else UTF-8; a clear error naming the file."""

from __future__ import annotations

import codecs
from pathlib import Path

from ftedit.errors import InputError, MissingInputError

# Longest marks first: the UTF-32-LE mark starts with the UTF-16-LE one.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class FileReadError(InputError):
    """A user's file that is missing, not a file, binary, or not in a text encoding ftedit can read."""

    def __init__(self, path: Path, reason: str, hint: str | None = None):
        super().__init__(f"{path}: {reason}", hint=hint)
        self.path = path
        self.reason = reason


class MissingFileError(FileReadError, MissingInputError):
    """The file does not exist."""


def detect_encoding(head: bytes) -> str:
    """The codec for a file starting with ``head``: its byte-order mark's, else UTF-8."""
    return next((name for bom, name in _BOMS if head.startswith(bom)), "utf-8")


def check_file(path: Path, what: str = "file") -> None:
    if not path.exists():
        raise MissingFileError(path, "no such file")
    if path.is_dir():
        raise FileReadError(path, f"is a directory, not a file; pass the {what} itself")
    if not path.is_file():
        raise FileReadError(path, "not a regular file")


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of ``path``: UTF-8 (with or without BOM) and UTF-16/32 with a BOM load; anything else is a
    :class:`FileReadError` that names the file and says how to fix it."""
    path = Path(path)
    check_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileReadError(path, f"cannot read it ({e.strerror})") from None
    encoding = detect_encoding(data[:4])
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise _decode_error(path, data, encoding, e) from None
    if "\x00" in text:
        raise FileReadError(path, "holds NUL characters: a binary file, or UTF-16 without a byte-order mark",
                            hint="save it as UTF-8 text")
    return text


def _decode_error(path: Path, data: bytes, encoding: str, e: UnicodeDecodeError) -> FileReadError:
    if _looks_binary(data[:1024]):
        return FileReadError(path, "not a text file (binary data, or UTF-16 without a byte-order mark)",
                             hint="save it as UTF-8 text")
    name = encoding.upper().removesuffix("-SIG")
    return FileReadError(path, f"not valid {name} text (byte 0x{data[e.start]:02x} at offset {e.start})",
                         hint="save the file as UTF-8")


def _looks_binary(head: bytes) -> bool:
    """NUL bytes or many control characters: not text in any 8-bit encoding a user would pick."""
    controls = sum(1 for b in head if b < 9 or 13 < b < 32)
    return b"\x00" in head or controls > len(head) // 20
