"""`omnilite serve`: an OpenAI-Realtime-protocol WebSocket server over `Session` (needs the `serve`
extra, websockets; the rest of the runtime never imports this package)."""

from .cli import add_parser, main

__all__ = ["add_parser", "main"]
