#!/usr/bin/env python3
"""Writes one length-prefixed gRPC message for h2load's -d option.

Only what the benches need, encoded by hand (strings and nested messages):
  grpc_frame.py get NAME                 -> GetUserRequest{name}
  grpc_frame.py create PARENT ID EMAIL   -> CreateUserRequest{parent, user{email}, user_id}
  grpc_frame.py lookup PARENT EMAIL      -> LookupUserRequest{parent, email}
"""
import struct
import sys


def field(number, payload):
    key = (number << 3) | 2  # length-delimited
    return varint(key) + varint(len(payload)) + payload


def varint(n):
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def main():
    kind, *args = sys.argv[1:]
    if kind == "get":
        msg = field(1, args[0].encode())
    elif kind == "create":
        parent, user_id, email = args
        msg = field(1, parent.encode()) + field(2, field(2, email.encode())) + field(3, user_id.encode())
    elif kind == "lookup":
        parent, email = args
        msg = field(1, parent.encode()) + field(2, email.encode())
    else:
        sys.exit(f"unknown message kind {kind}")
    sys.stdout.buffer.write(b"\x00" + struct.pack(">I", len(msg)) + msg)


main()
