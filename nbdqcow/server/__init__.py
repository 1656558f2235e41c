"""The asyncio shell around the sans-I/O codec: the only place with sockets and tasks."""
