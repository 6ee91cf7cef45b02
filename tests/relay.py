"""A TCP relay on loopback between a test's client and a server, for what happens to connections: it counts them
(`accepted`), and can go silent (`go_silent`): pass no byte either way from then on and close nothing, as a caller
whose host went down or whose network was cut looks to the server (the kernel still takes what the server sends:
loopback never drops a packet, but nothing comes back)."""

from __future__ import annotations

import asyncio

from raw_server import RawServer

_READ_BYTES = 65536


class Relay(RawServer):
    """A relay to the server on `port`; `accepted` counts the connections clients opened through it."""

    def __init__(self, port: int) -> None:
        super().__init__(self._relay)
        self._port = port
        self._silent = asyncio.Event()

    @property
    def target(self) -> str:
        """The gRPC target to reach the server through the relay."""
        return f"127.0.0.1:{self.port}"

    def go_silent(self) -> None:
        self._silent.set()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._port)
        try:
            await asyncio.gather(self._pump(reader, server_writer), self._pump(server_reader, writer))
        finally:
            server_writer.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Passes what `source` sends on to `sink` until either end closes; once silent, holds both open for ever."""
        silent = asyncio.ensure_future(self._silent.wait())
        try:
            while True:
                reading = asyncio.ensure_future(source.read(_READ_BYTES))
                await asyncio.wait((reading, silent), return_when=asyncio.FIRST_COMPLETED)
                if silent.done():
                    reading.cancel()
                    await asyncio.Event().wait()  # read nothing more, close nothing: until the relay stops
                data = reading.result()
                if not data:
                    sink.close()  # the end closed: the other end hears it
                    return
                sink.write(data)
                await sink.drain()
        finally:
            silent.cancel()
