"""tokenfan's Trio broker: the server, the hub, connections, and a Python client.

Embed it in a Trio app::

    import trio
    import broker

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fan = await nursery.start(broker.serve, broker.Config(port=8765))
            await fan.emit("ai-chat/42", "ai:token", {"token": "Hello"})
"""

from broker.config import ChannelOptions, Config, ConfigError, load_config
from broker.errors import EmitError, EngineUnavailable
from broker.hub import Publication
from broker.server import Broker, BrokerStatistics, serve

__all__ = ["Broker", "BrokerStatistics", "ChannelOptions", "Config", "ConfigError", "EmitError",
           "EngineUnavailable", "Publication", "load_config", "serve"]
