"""``python -m lepton.demo.embedded_broker --port P``: an amqtt broker until SIGTERM/SIGINT.

For machines without Mosquitto. MQTT 3.1.1 on 127.0.0.1, anonymous, no topic checks, no
``$SYS`` tree; everything in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

log = logging.getLogger(__name__)


def broker_config(port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """amqtt's configuration for one anonymous TCP listener."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Only anonymous authentication: no $SYS publisher, no packet logger, no topic checks.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def serve(port: int, host: str = "127.0.0.1") -> None:
    """Run the broker until SIGTERM or SIGINT."""
    from amqtt.broker import Broker

    broker = Broker(broker_config(port, host))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await broker.start()
    log.warning("embedded broker listening on %s:%d", host, port)
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lepton.demo.embedded_broker")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # amqtt logs every connection and packet at INFO.
    logging.getLogger("amqtt").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        asyncio.run(serve(args.port, args.host))
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C during shutdown
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
