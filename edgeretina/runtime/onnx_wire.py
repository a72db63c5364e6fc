"""Serialize a small ONNX model without the `onnx` package (the device runtime does not install it).

Only what the runtime builds itself needs: nodes with int attributes, initializers as raw little-endian
tensors, inputs and outputs with fixed or named dimensions. The encoding is protobuf's wire format for the
fields of onnx.proto (field numbers below); tests/test_onnx_wire.py parses the bytes with `onnx` and
checks them against a model built with onnx.helper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IR_VERSION = 8
# TensorProto.DataType
ELEM_TYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3,
              np.dtype(np.int32): 6, np.dtype(np.int64): 7}
ATTRIBUTE_INT = 2   # AttributeProto.AttributeType.INT

_VARINT, _LEN = 0, 2


@dataclass(frozen=True)
class Node:
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    int_attributes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ValueInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]     # an int is a fixed size, a str a named (free) dimension


def model_bytes(nodes: list[Node], initializers: dict[str, np.ndarray], inputs: list[ValueInfo],
                outputs: list[ValueInfo], opset: int = 17, name: str = "edgeretina") -> bytes:
    graph = b"".join(_message(1, _node(n, f"{n.op_type}_{i}")) for i, n in enumerate(nodes))
    graph += _string(2, name)
    graph += b"".join(_message(5, _tensor(key, value)) for key, value in initializers.items())
    graph += b"".join(_message(11, _value_info(v)) for v in inputs)
    graph += b"".join(_message(12, _value_info(v)) for v in outputs)
    opset_import = _string(1, "") + _int(2, opset)
    return _int(1, IR_VERSION) + _string(2, "edgeretina") + _message(7, graph) + _message(8, opset_import)


def _node(node: Node, name: str) -> bytes:
    body = b"".join(_string(1, i) for i in node.inputs) + b"".join(_string(2, o) for o in node.outputs)
    body += _string(3, name) + _string(4, node.op_type)
    for key, value in node.int_attributes.items():
        body += _message(5, _string(1, key) + _int(3, value) + _int(20, ATTRIBUTE_INT))
    return body


def _tensor(name: str, value: np.ndarray) -> bytes:
    value = np.ascontiguousarray(value)
    body = b"".join(_int(1, d) for d in value.shape) + _int(2, _elem_type(value.dtype)) + _string(8, name)
    return body + _bytes(9, value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes())


def _value_info(info: ValueInfo) -> bytes:
    dims = b"".join(_message(1, _string(2, d) if isinstance(d, str) else _int(1, d)) for d in info.shape)
    tensor_type = _int(1, _elem_type(info.dtype)) + _message(2, dims)
    return _string(1, info.name) + _message(2, _message(1, tensor_type))


def _elem_type(dtype) -> int:
    try:
        return ELEM_TYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no ONNX element type for {np.dtype(dtype)}") from None


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64          # protobuf encodes negative int64 as ten-byte two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _int(number: int, value: int) -> bytes:
    return _key(number, _VARINT) + _varint(int(value))


def _bytes(number: int, value: bytes) -> bytes:
    return _key(number, _LEN) + _varint(len(value)) + value


def _string(number: int, value: str) -> bytes:
    return _bytes(number, value.encode("utf-8"))


def _message(number: int, body: bytes) -> bytes:
    return _bytes(number, body)

