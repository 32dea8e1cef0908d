"""`omnilite serve BUNDLE [--host 127.0.0.1] [--port 8765] [--api-key KEY]`: the argument parser and
the command. omnilite/cli.py adds the bundle and run options (shared with `run` and `chat`) and
builds the PipelineConfig; websockets is imported only when the command runs (the `serve` extra)."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import OmniliteError


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; pass a number above 0")
        return value
    return parse


def add_parser(subparsers, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    s = subparsers.add_parser("serve", parents=list(parents),
                              help="serve a bundle over the OpenAI Realtime protocol (WebSocket) with a browser page")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --api-key)")
    s.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0: any free port)")
    s.add_argument("--api-key", default=os.environ.get("OMNILITE_API_KEY"),
                   help="require this key (Bearer header, or the openai-insecure-api-key.KEY subprotocol); "
                        "default: $OMNILITE_API_KEY")
    s.add_argument("--slots", type=_positive(int), default=1,
                   help="conversations answered at once, one model context each (default 1)")
    s.add_argument("--queue", type=int, default=4, help="connections that may wait for a slot; more get 'busy' (default 4)")
    s.add_argument("--idle-timeout", type=_positive(float), default=600.0, help="close a silent connection after this many s")
    s.add_argument("--vad", choices=("auto", "silero", "energy"), default="auto")
    s.add_argument("--n-ctx", type=_positive(int), default=8192, help="LLM context per conversation")
    return s


def main(args: argparse.Namespace, pipeline_config) -> int:
    """Run the server until Ctrl-C. `pipeline_config` is the PipelineConfig for args' bundle."""
    from ..pipeline import Pipeline
    from ..session import SessionConfig
    from .server import RealtimeServer, ServeConfig, load_pipelines

    if not (0 <= args.port <= 65535):
        raise OmniliteError(f"--port {args.port} is not a TCP port; pass 0..65535 (0: any free port).")
    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, slots=args.slots, queue=args.queue,
                         idle_timeout_s=args.idle_timeout, session=SessionConfig(vad=args.vad))
    config.validate()  # before loading a multi-GB model
    bundle = Path(args.bundle)
    pipes = load_pipelines(lambda: Pipeline.load(bundle, pipeline_config), config.slots)

    async def serve() -> None:
        server = RealtimeServer(pipes, config, model_id=bundle.resolve().name)
        try:
            await server.start()
        except OSError as e:
            raise OmniliteError(f"cannot listen on {config.host}:{config.port} ({e.strerror or e}); choose another "
                                "--port or --host.") from None
        host = f"[{config.host}]" if ":" in config.host else config.host
        print(f"serving {bundle} on ws://{host}:{server.port}/v1/realtime and the page on http://{host}:{server.port}/ "
              "(Ctrl-C stops)", flush=True)
        try:
            await server.serve_forever()
        finally:
            await server.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        print("\nstopped")
    finally:
        for p in pipes:
            p.close()
    return 0
