"""TensorBoard event files without TensorFlow: scalar summaries written (and read back) directly.

An event file is a TFRecord stream (length, masked CRC32C, payload, masked CRC32C) of `Event`
protocol buffers. We only need scalars, so the few protobuf fields involved are encoded by hand:
Event{wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5}; Summary{value=1};
Summary.Value{tag=1 (string), simple_value=2 (float)}. TensorBoard reads these files as usual.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def _event(step: int, wall_time: float, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
  msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    msg += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
        for tag, value in scalars.items())
    msg += _bytes_field(5, values)
  return msg


class EventFileWriter:
  """Appends scalar summaries to `logdir/events.out.tfevents.<time>.<host>`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._write(_event(0, time.time(), file_version="brain.Event:2"))

  def _write(self, payload: bytes) -> None:
    header = struct.pack("<Q", len(payload))
    self._file.write(header + struct.pack("<I", _masked_crc(header)) + payload
                     + struct.pack("<I", _masked_crc(payload)))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    self._write(_event(step, time.time(), scalars={k: float(v) for k, v in values.items()}))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return result, pos


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes | float]]:
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = struct.unpack_from("<d", buf, pos)[0], pos + 8
    elif wire == 5:
      value, pos = struct.unpack_from("<f", buf, pos)[0], pos + 4
    elif wire == 2:
      length, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + length], pos + length
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield number, value


def read_scalars(path: str) -> list[tuple[int, str, float]]:
  """`(step, tag, value)` of every scalar in an event file; checks every record's CRCs."""
  out = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    if struct.unpack_from("<I", data, pos + 8)[0] != _masked_crc(header):
      raise ValueError(f"{path}: corrupt record header at byte {pos}")
    payload = data[pos + 12:pos + 12 + length]
    if struct.unpack_from("<I", data, pos + 12 + length)[0] != _masked_crc(payload):
      raise ValueError(f"{path}: corrupt record at byte {pos}")
    pos += 16 + length
    event = dict(_fields(payload))
    if 5 not in event:
      continue
    for number, value in _fields(event[5]):
      if number == 1:
        fields = dict(_fields(value))
        out.append((event.get(2, 0), fields[1].decode(), fields[2]))
  return out
