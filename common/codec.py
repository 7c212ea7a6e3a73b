"""msgpack encoding of messages, with numpy arrays sent as separate zero-copy frames.

Frame 0 is the msgpack body. Each array inside a message is replaced by a msgpack extension
(code 1) holding (frame index, dtype, shape); its bytes travel as their own ZMQ frame, sent
with copy=False and viewed (not copied) on receipt.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

_ARRAY_EXT = 1


class Encoder:
    def __init__(self) -> None:
        self._aux: list[memoryview] = []
        self._enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._meta = msgspec.msgpack.Encoder()

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            arr = np.ascontiguousarray(obj)
            self._aux.append(memoryview(arr.data).cast("B"))
            meta = self._meta.encode((len(self._aux), arr.dtype.str, list(arr.shape)))
            return msgspec.msgpack.Ext(_ARRAY_EXT, meta)
        raise NotImplementedError(f"cannot encode {type(obj).__name__}")

    def encode(self, msg: Any) -> list[bytes | memoryview]:
        self._aux = []
        body = self._enc.encode(msg)
        frames: list[bytes | memoryview] = [body, *self._aux]
        self._aux = []
        return frames


class Decoder:
    """Decodes one Union of message types (what one socket accepts)."""

    def __init__(self, types: Any) -> None:
        self._frames: list[Any] = []
        self._dec: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
            types, ext_hook=self._ext_hook
        )
        self._meta: msgspec.msgpack.Decoder[tuple[int, str, list[int]]] = msgspec.msgpack.Decoder(
            tuple[int, str, list[int]]
        )

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code != _ARRAY_EXT:
            raise msgspec.DecodeError(f"unknown extension {code}")
        index, dtype, shape = self._meta.decode(data)
        buf = self._frames[index]
        return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)

    def decode(self, frames: list[Any]) -> Any:
        self._frames = frames
        try:
            return self._dec.decode(frames[0])
        finally:
            self._frames = []
