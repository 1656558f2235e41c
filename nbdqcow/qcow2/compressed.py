"""Decompression of compressed clusters (qcow2.txt "Compressed Clusters Descriptor",
header field compression_type: 0 raw deflate with window bits 12, 1 zstd)."""

from __future__ import annotations

import io
import zlib

import zstandard

from nbdqcow.errors import CorruptImage
from nbdqcow.qcow2 import layout as L


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    try:
        if compression_type == L.COMPRESSION_ZLIB:
            d = zlib.decompressobj(-12)
            out = d.decompress(data, cluster_size)
        elif compression_type == L.COMPRESSION_ZSTD:
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            out = reader.read(cluster_size)
            while len(out) < cluster_size:
                more = reader.read(cluster_size - len(out))
                if not more:
                    break
                out += more
        else:
            raise CorruptImage(f"unknown compression type {compression_type}")
    except (zlib.error, zstandard.ZstdError) as e:
        raise CorruptImage(f"compressed cluster cannot be decompressed: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImage("compressed cluster does not decompress to one cluster")
    return out
