"""The protobuf wire format of ONNX files, read and written directly, for models too large to
parse or serialize whole: a ModelProto is a sequence of (tag, value) fields, a nested message
is a length-delimited field, the fields of a message may come in any order and a repeated
field's entries may be written apart. Splitting a single-file model into external data
(`split`) reads the weights' bytes with the kernel's file-to-file copy, so no copy of them
ever enters the process."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import onnx

MODEL_GRAPH = 7          # ModelProto.graph
MODEL_OPSET_IMPORT = 8   # ModelProto.opset_import
GRAPH_INITIALIZER = 5    # GraphProto.initializer
TENSOR_RAW_DATA = 9      # TensorProto.raw_data
TENSOR_DATA_LOCATION = 14  # TensorProto.data_location
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5
ALIGNMENT = 4096  # external tensors start on a page: mappable, and aligned for any dtype


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_header(number: int, payload_size: int) -> bytes:
    """The tag and length of a length-delimited field."""
    return varint(number << 3 | _LENGTH_DELIMITED) + varint(payload_size)


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, value start, value end, field start) of each field in buf[start:end];
    a varint's value span is its bytes. ValueError on anything that is not a well-formed message."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == _VARINT:
            _, value_end = _read_varint(buf, pos, end)
        elif wire == _FIXED64:
            value_end = pos + 8
        elif wire == _FIXED32:
            value_end = pos + 4
        elif wire == _LENGTH_DELIMITED:
            length, pos = _read_varint(buf, pos, end)
            value_end = pos + length
        else:  # groups (3, 4) are not used by ONNX; 6, 7 do not exist
            raise ValueError(f"wire type {wire}")
        if value_end > end:
            raise ValueError("a field runs past the end of its message")
        yield number, wire, pos, value_end, field_start
        pos = value_end


def split(path: Path, target: Path, *, location: str, threshold: int = 1024) -> bool:
    """Write the single-file model `path` again as `target`, each main-graph initializer whose
    raw_data has at least `threshold` bytes moved to the external-data file `location` beside
    it (page-aligned). The bytes move file to file (copy_file_range, else sendfile); only the
    graph's structure is read into memory. False, writing nothing, when the file has no graph
    or opset import or already refers to external data (the caller loads it the usual way);
    ValueError when it is not a well-formed protobuf."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        head, graphs, opsets = bytearray(), [], 0
        for number, wire, start, end, field_start in fields(buf, 0, len(buf)):
            if number == MODEL_GRAPH and wire == _LENGTH_DELIMITED:
                graphs.append((start, end))
            else:
                opsets += number == MODEL_OPSET_IMPORT
                head += buf[field_start:end]
        if len(graphs) != 1 or not opsets:
            return False
        graph, moves, offset = bytearray(), [], 0
        for number, wire, start, end, field_start in fields(buf, *graphs[0]):
            if number != GRAPH_INITIALIZER or wire != _LENGTH_DELIMITED:
                graph += buf[field_start:end]
                continue
            header, raw = bytearray(), None
            for t_number, t_wire, t_start, t_end, t_field in fields(buf, start, end):
                if t_number == TENSOR_DATA_LOCATION and _read_varint(buf, t_start, t_end)[0] == onnx.TensorProto.EXTERNAL:
                    return False
                if t_number == TENSOR_RAW_DATA and t_wire == _LENGTH_DELIMITED:
                    raw = (t_start, t_end)
                else:
                    header += buf[t_field:t_end]
            if raw is None or raw[1] - raw[0] < threshold:
                graph += buf[field_start:end]
                continue
            length = raw[1] - raw[0]
            offset = -(-offset // ALIGNMENT) * ALIGNMENT
            tensor = onnx.TensorProto.FromString(bytes(header))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
            encoded = tensor.SerializeToString()
            graph += field_header(GRAPH_INITIALIZER, len(encoded)) + encoded
            moves.append((raw[0], offset, length))
            offset += length
    with open(path, "rb") as src, open(target.with_name(location), "wb") as dst:
        for src_offset, dst_offset, length in moves:
            copy_range(src, dst, src_offset, dst_offset, length)
    with open(target, "wb") as out:
        out.write(head)
        out.write(field_header(MODEL_GRAPH, len(graph)))
        out.write(graph)
    return True


def copy_range(src, dst, src_offset: int, dst_offset: int, length: int) -> None:
    """Copy `length` bytes between open regular files inside the kernel where it can."""
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src.fileno(), dst.fileno(), length - done, src_offset + done, dst_offset + done)
            if n == 0:
                break
            done += n
    except (AttributeError, OSError):  # not on this platform, or across these filesystems
        pass
    if done < length:
        dst.flush()
        os.lseek(dst.fileno(), dst_offset + done, os.SEEK_SET)
        while done < length:
            n = os.sendfile(dst.fileno(), src.fileno(), src_offset + done, length - done)
            if n == 0:
                raise OSError(f"could not copy {length} bytes at offset {src_offset}: the file ended early")
            done += n
