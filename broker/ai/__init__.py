"""The AI streaming path: token sources (providers) behind one interface.

:mod:`broker.ai.providers` defines the interface; :mod:`broker.ai.demo` is the
offline source the quick start and the tests use.
"""

from broker.ai.demo import DemoProvider
from broker.ai.providers import ChatMessage, Provider, ProviderError

__all__ = ["ChatMessage", "DemoProvider", "Provider", "ProviderError"]
