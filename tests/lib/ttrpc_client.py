"""A minimal ttrpc client for the agent API, for scripts that cannot use the
`vmrt agent` subcommand (the bench's Health poll, guest-rootfs/agent-order.py's
calls to an agent on a plain Unix socket).

ttrpc frame: u32 BE length, u32 BE stream id, u8 type (1 request, 2 response),
u8 flags; request = protobuf {1: service, 2: method, 3: payload}; response =
{1: Status status, 2: bytes payload}, Status = {1: int32 code, 2: message}.
Hybrid vsock (docs/contracts.md): `CONNECT <port>\\n` -> `OK <n>\\n` first.
"""

import socket
import struct

AGENT_SERVICE = "vmrt.agent.v1.Agent"  # protocol/protos/agent.proto


def pb_len(field, data):
    """One length-delimited protobuf field."""
    n, out = len(data), bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes([(field << 3) | 2]) + bytes(out) + data


def varint(data, i):
    """(value, next index) of the protobuf varint at data[i]; OSError when truncated."""
    n = shift = 0
    while True:
        if i >= len(data):
            raise OSError("truncated varint in a ttrpc response")
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def pb_fields(data):
    """{field number: value} of a protobuf message's varint and length-delimited
    fields; OSError on any other wire type."""
    out, i = {}, 0
    while i < len(data):
        key, i = varint(data, i)
        if key & 7 == 0:
            out[key >> 3], i = varint(data, i)
        elif key & 7 == 2:
            n, i = varint(data, i)
            out[key >> 3], i = data[i:i + n], i + n
        else:
            raise OSError(f"unexpected protobuf wire type {key & 7} in a ttrpc response")
    return out


def _recv_exactly(s, n, what):
    data = b""
    while len(data) < n:
        c = s.recv(n - len(data))
        if not c:
            raise OSError(f"{what}: connection closed")
        data += c
    return data


def call(uds, method, timeout=2.0, hybrid_port=None, stream_id=1):
    """Calls agent `method` with an Empty payload over Unix socket `uds` (through
    the VMM's hybrid vsock to `hybrid_port` when given). True when the response
    carries no error status, False for an error status; OSError when the
    connection fails or the response is malformed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(uds)
        if hybrid_port is not None:
            s.sendall(f"CONNECT {hybrid_port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                line += _recv_exactly(s, 1, "CONNECT")
            if not line.startswith(b"OK "):
                raise OSError(f"CONNECT {hybrid_port}: {line!r}")
        body = pb_len(1, AGENT_SERVICE.encode()) + pb_len(2, method.encode()) + pb_len(3, b"")
        s.sendall(struct.pack(">IIBB", len(body), stream_id, 1, 0) + body)
        length, sid, mtype, _ = struct.unpack(">IIBB", _recv_exactly(s, 10, method))
        data = _recv_exactly(s, length, method)
        if mtype != 2 or sid != stream_id:
            raise OSError(f"{method}: frame type {mtype}, stream {sid}")
        status = pb_fields(data).get(1)
        return not (status and pb_fields(status).get(1, 0) != 0)
