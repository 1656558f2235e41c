"""Sans-I/O NBD codec: bytes in -> events out, replies in -> bytes out.  No sockets here."""
