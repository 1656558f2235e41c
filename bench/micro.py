#!/usr/bin/env python3
"""Micro benchmarks of the NBD codec hot paths (no sockets): nanoseconds per operation.

Server side: framing requests out of a byte stream (READ headers, 4 KiB WRITEs with
payload), encoding simple and structured replies.  Client side: building request
headers and parsing reply headers.  Run before and after an optimisation:

    .venv/bin/python bench/micro.py [--n 200000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbdqcow.nbd import client as cc  # noqa: E402
from nbdqcow.nbd.constants import Cmd, CmdFlag  # noqa: E402
from nbdqcow.nbd.transmission import ReplyEncoder, RequestDecoder  # noqa: E402


def timed(n: int, fn: Callable[[], int]) -> float:
    """ns per operation; ``fn`` returns how many operations it did."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        ops = fn()
        best = min(best, (time.perf_counter_ns() - t0) / max(ops, 1))
    return best


def bench_decode_reads(n: int) -> float:
    stream = b"".join(cc.build_request(Cmd.READ, 0, i, i * 4096, 4096) for i in range(n))

    def run() -> int:
        dec = RequestDecoder()
        got = 0
        for off in range(0, len(stream), 64 * 1024):  # 64 KiB socket reads
            got += len(dec.feed(stream[off : off + 64 * 1024]))
        assert got == n
        return got

    return timed(n, run)


def bench_decode_writes(n: int) -> float:
    payload = bytes(4096)
    stream = b"".join(
        cc.build_request(Cmd.WRITE, 0, i, i * 4096, 4096) + payload for i in range(n // 4)
    )

    def run() -> int:
        dec = RequestDecoder()
        got = 0
        for off in range(0, len(stream), 256 * 1024):
            got += len(dec.feed(stream[off : off + 256 * 1024]))
        assert got == n // 4
        return got

    return timed(n // 4, run)


def bench_encode(n: int, structured: bool) -> float:
    enc = ReplyEncoder(structured=structured)

    def run() -> int:
        for i in range(n):
            if structured:
                enc.data(i, i * 4096, 4096, True, i * 4096)
            else:
                enc.read_simple(i)
        return n

    return timed(n, run)


def bench_client_request(n: int) -> float:
    def run() -> int:
        build = cc.build_request
        for i in range(n):
            build(Cmd.WRITE, CmdFlag.FUA, i, i * 4096, 4096)
        return n

    return timed(n, run)


def bench_client_reply(n: int) -> float:
    raw = ReplyEncoder(structured=True).data(7, 4096, 4096, True, 4096)[: cc.STRUCTURED_REPLY.size]

    def run() -> int:
        size, parse = cc.reply_header_size, cc.parse_reply_header
        for _ in range(n):
            size(raw)
            parse(raw)
        return n

    return timed(n, run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="operations per measurement")
    n = p.parse_args(argv).n
    cases = [
        ("server: frame READ requests", lambda: bench_decode_reads(n)),
        ("server: frame 4 KiB WRITE requests", lambda: bench_decode_writes(n)),
        ("server: encode simple READ reply header", lambda: bench_encode(n, False)),
        ("server: encode structured OFFSET_DATA header", lambda: bench_encode(n, True)),
        ("client: build request header", lambda: bench_client_request(n)),
        ("client: parse structured reply header", lambda: bench_client_reply(n)),
    ]
    for name, fn in cases:
        print(f"{name:<46} {fn():8.0f} ns/op", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
