"""The messages between the page and the server, and their limits: one home for the wire format.

Transport: one WebSocket per player. Text messages are JSON objects; the server sends each
decoded frame as one binary message, a 12-byte header (:data:`FRAME_HEADER`: world, chunk,
frame index, frames in the chunk; big-endian) followed by a JPEG. Uploads go over HTTP
(``POST /api/upload``, the image bytes as the body), never over the socket.

Client -> server (anything else is a protocol error and ends the connection):

* ``{"type": "start", "image": {"sample": NAME} | {"upload": ID}, "prompt": TEXT}``: start (or
  restart) the world from that image and prompt;
* ``{"type": "keys", "down": [KEY, ...], "seq": N}``: the complete set of keys held now (keys
  are :data:`KEYS`); ``seq`` numbers the change, and a chunk echoes the last ``seq`` it saw, so
  a client can time a key change to the first frame that shows it;
* ``{"type": "look", "dx": PX, "dy": PX, "seq": N}``: mouse movement since the last one;
* ``{"type": "played", "world": W, "chunk": C}``: the page started showing that chunk (flow
  control: the server keeps at most one chunk ahead of playback);
* ``{"type": "reset"}``: start the same world over.

Server -> client: ``hello`` (samples, frame size, limits), ``started``, ``chunk`` (index, the
keys and action the chunk was generated with, the camera path of its 4 latents for the minimap,
timings), binary frames, ``full`` (the world reached ``--max-chunks``), ``busy`` (another player
has the GPU), ``error`` (with a one-line message; the server closes after protocol errors).

Parsing is strict: a message over :data:`MAX_TEXT_BYTES`, invalid JSON (NaN and Infinity
included), duplicate or unknown fields, wrong types, out-of-range numbers, unknown keys: all are
:class:`ProtocolError` with a one-line reason.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

__all__ = [
    "FRAME_HEADER",
    "KEYS",
    "MAX_PROMPT_CHARS",
    "MAX_TEXT_BYTES",
    "MAX_UPLOAD_BYTES",
    "ProtocolError",
    "Keys",
    "Look",
    "Played",
    "Reset",
    "Start",
    "pack_frame",
    "parse_client_message",
    "unpack_frame",
]

#: The keys a page may report (WASD move, arrows turn), by the pose grammar's names.
KEYS = frozenset({"w", "a", "s", "d", "up", "down", "left", "right"})
#: The largest text message accepted (a keys message is ~60 bytes; a start message carries the prompt).
MAX_TEXT_BYTES = 8192
#: The longest prompt (umT5 reads 512 tokens; 2000 characters is well past that).
MAX_PROMPT_CHARS = 2000
#: The largest upload, more than any photo a page would send (a 4096x4096 PNG is ~30 MB only when
#: noise); the image is then decoded and checked by worldplay.media.load_image like a CLI image.
MAX_UPLOAD_BYTES = 16 * 2**20
#: The longest name of a sample image or upload id.
MAX_NAME_CHARS = 64
_MAX_SEQ = 2**53 - 1  # exact in a JavaScript number
_MAX_LOOK_PX = 1e5
FRAME_HEADER = struct.Struct(">IIHH")  # world, chunk, frame, frames in the chunk


class ProtocolError(ValueError):
    """A client message breaks the protocol; the message says how (one line)."""


@dataclass(frozen=True)
class Start:
    """A client message: start (or restart) the world from a sample image or an upload, with a prompt."""

    sample: str | None
    upload: str | None
    prompt: str


@dataclass(frozen=True)
class Keys:
    """A client message: the complete set of keys held now; ``seq`` numbers the change."""

    down: frozenset[str]
    seq: int


@dataclass(frozen=True)
class Look:
    """A client message: mouse movement in CSS pixels since the last one."""

    dx: float
    dy: float
    seq: int


@dataclass(frozen=True)
class Played:
    """A client message: the page started showing chunk ``chunk`` of world ``world``."""

    world: int
    chunk: int


@dataclass(frozen=True)
class Reset:
    """A client message: start the same world over."""


ClientMessage = Start | Keys | Look | Played | Reset

_FIELDS = {
    "start": {"type", "image", "prompt"},
    "keys": {"type", "down", "seq"},
    "look": {"type", "dx", "dy", "seq"},
    "played": {"type", "world", "chunk"},
    "reset": {"type"},
}


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"field {_show(key)} appears twice")
        out[key] = value
    return out


def _no_constants(name):
    raise ProtocolError(f"{name} is not a number JSON allows")


def _show(value, limit: int = 40) -> str:
    """A value for an error message: repr, one line, bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int(message: dict, name: str, top: int) -> int:
    value = message[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ProtocolError(f"{name} must be an integer in 0..{top}, got {_show(value)}")
    return value


def _number(message: dict, name: str, bound: float) -> float:
    value = message[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or abs(value) > bound:
        raise ProtocolError(f"{name} must be a number within +-{bound:g}, got {_show(value)}")
    return float(value)


def _name(value, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS or not value.isprintable():
        raise ProtocolError(f"{what} must be a name of 1..{MAX_NAME_CHARS} printable characters, got {_show(value)}")
    return value


def parse_client_message(data: str | bytes) -> ClientMessage:
    """One client text message -> its record, or :class:`ProtocolError`."""
    if isinstance(data, bytes):
        raise ProtocolError("binary messages are not accepted; send JSON text (uploads go to POST /api/upload)")
    if len(data) > MAX_TEXT_BYTES or len(data.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
        raise ProtocolError(f"message of {len(data.encode('utf-8', 'surrogatepass'))} bytes is over the "
                            f"{MAX_TEXT_BYTES}-byte limit")
    try:
        message = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"message is not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(message).__name__}")
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise ProtocolError(f"type must be one of {', '.join(sorted(_FIELDS))}, got {_show(kind)}")
    fields = set(message)
    if fields != _FIELDS[kind]:
        missing, extra = sorted(_FIELDS[kind] - fields), sorted(fields - _FIELDS[kind])
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(_show(e, 20) for e in extra[:5])}"] if extra else [])
        raise ProtocolError(f"{kind} message: {'; '.join(parts)}")
    if kind == "keys":
        down = message["down"]
        if not isinstance(down, list) or len(down) > len(KEYS):
            raise ProtocolError(f"down must be a list of at most {len(KEYS)} keys, got {_show(down)}")
        for key in down:
            if not isinstance(key, str) or key not in KEYS:
                raise ProtocolError(f"unknown key {_show(key)}; keys are {', '.join(sorted(KEYS))}")
        return Keys(frozenset(down), _int(message, "seq", _MAX_SEQ))
    if kind == "look":
        return Look(_number(message, "dx", _MAX_LOOK_PX), _number(message, "dy", _MAX_LOOK_PX),
                    _int(message, "seq", _MAX_SEQ))
    if kind == "played":
        return Played(_int(message, "world", 2**32 - 1), _int(message, "chunk", 2**32 - 1))
    if kind == "reset":
        return Reset()
    image, prompt = message["image"], message["prompt"]
    if not isinstance(image, dict) or len(image) != 1 or not set(image) <= {"sample", "upload"}:
        raise ProtocolError('image must be {"sample": NAME} or {"upload": ID}')
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        raise ProtocolError(f"prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
    if any(not (c.isprintable() or c in "\n\t") for c in prompt):
        raise ProtocolError("prompt must be printable text (no control characters)")
    (which, name), = image.items()
    name = _name(name, f"image {which}")
    return Start(sample=name if which == "sample" else None, upload=name if which == "upload" else None,
                 prompt=prompt)


def pack_frame(world: int, chunk: int, frame: int, frames: int, jpeg: bytes) -> bytes:
    return FRAME_HEADER.pack(world, chunk, frame, frames) + jpeg


def unpack_frame(data: bytes) -> tuple[int, int, int, int, bytes]:
    """(world, chunk, frame, frames, jpeg) of a binary frame message."""
    if len(data) < FRAME_HEADER.size:
        raise ProtocolError(f"frame message of {len(data)} bytes has no {FRAME_HEADER.size}-byte header")
    return (*FRAME_HEADER.unpack_from(data), data[FRAME_HEADER.size :])
