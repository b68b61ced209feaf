"""The inputs and outputs an ONNX file really declares, read from its protobuf without onnx or a session.

``load_bundle`` compares them with the manifest, so a file swapped for another graph (a stage replaced by its
neighbour, another model's ``full.onnx``) is named at load time, not found by a failing frame. Only the few
fields needed are decoded (ModelProto.graph -> GraphProto.input/output -> ValueInfoProto name and tensor type);
every other field, the weights included, is skipped by its length, so a 45 MB file costs a few milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union
from ..errors import EdgeexitError

__all__ = ["OnnxIOError", "read_io", "ONNX_DTYPES"]

ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool", 11: "float64"}

Dim = Union[int, str]
IOSpec = Tuple[str, Tuple[Dim, ...], str]


class OnnxIOError(EdgeexitError, ValueError):
    """The file is not a readable ONNX model."""


def _varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    shift = value = 0
    while True:
        if pos >= len(buf):
            raise OnnxIOError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise OnnxIOError("varint too long")


def _fields(buf: memoryview) -> Iterator[Tuple[int, int, object]]:
    """(field number, wire type, value) of one message: ints for varints, memoryviews for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise OnnxIOError("truncated field")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise OnnxIOError(f"unsupported wire type {wire}")
        yield field, wire, value


def _value_info(buf: memoryview) -> IOSpec:
    name, dtype, dims = "", "?", []
    for field, _, value in _fields(buf):
        if field == 1:
            name = bytes(value).decode("utf-8", "replace")
        elif field == 2:  # TypeProto
            for f2, _, tensor in _fields(value):
                if f2 != 1:  # tensor_type
                    continue
                for f3, _, v3 in _fields(tensor):
                    if f3 == 1:
                        dtype = ONNX_DTYPES.get(int(v3), str(v3))
                    elif f3 == 2:  # TensorShapeProto
                        for f4, _, dim in _fields(v3):
                            if f4 != 1:
                                continue
                            d: Dim = "?"
                            for f5, _, v5 in _fields(dim):
                                if f5 == 1:
                                    d = int(v5)
                                elif f5 == 2:
                                    d = bytes(v5).decode("utf-8", "replace")
                            dims.append(d)
    return name, tuple(dims), dtype


def read_io(path: Union[str, Path], content: Optional[bytes] = None) -> Tuple[List[IOSpec], List[IOSpec]]:
    """(inputs, outputs) of an ONNX file as (name, shape, dtype); initializers listed as inputs are left out.
    ``content``: the file's bytes when the caller has read them already."""
    try:
        data = memoryview(Path(path).read_bytes() if content is None else content)
        graph = next((v for f, w, v in _fields(data) if f == 7 and w == 2), None)
        if graph is None:
            raise OnnxIOError("no graph")
        inputs, outputs, initializers = [], [], set()
        for field, wire, value in _fields(graph):
            if wire != 2:
                continue
            if field == 11:
                inputs.append(_value_info(value))
            elif field == 12:
                outputs.append(_value_info(value))
            elif field == 5:  # TensorProto initializer: its name is field 8
                for f, _, v in _fields(value):
                    if f == 8:
                        initializers.add(bytes(v).decode("utf-8", "replace"))
    except (OnnxIOError, IndexError, UnicodeError) as exc:
        raise OnnxIOError(f"{Path(path).name}: not a readable ONNX model ({exc})") from None
    return [i for i in inputs if i[0] not in initializers], outputs
