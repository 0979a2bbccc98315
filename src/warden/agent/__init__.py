"""The device agent: the only Warden code that runs on a device.

It onboards through EST with an onboarding certificate or a token, keeps its operational key in a key store (a 0600
file or a PKCS#11 token), renews before expiry, and holds one MQTT 5 session over mutual TLS on its own topics.
It imports nothing of the hub (an import-linter contract keeps it so); see docs/agent.md.
"""

from warden.agent._agent import Agent, RenewalState, read_status, system_metrics
from warden.agent._config import AgentConfig, BrokerConfig, HubConfig, KeystoreConfig, OnboardingConfig, load_config
from warden.agent._est import EstClient, EstError, EstRefusedError, EstResult, EstUnavailableError
from warden.agent._identity import Identity, IdentityStore
from warden.agent._keys import DeviceKeys, FileDeviceKeys, Pkcs11DeviceKeys
from warden.agent._queue import FileQueue, MemoryQueue, MessageQueue
from warden.agent._session import Session, SessionState

__all__ = [
    "Agent",
    "AgentConfig",
    "BrokerConfig",
    "DeviceKeys",
    "EstClient",
    "EstError",
    "EstRefusedError",
    "EstResult",
    "EstUnavailableError",
    "FileDeviceKeys",
    "FileQueue",
    "HubConfig",
    "Identity",
    "IdentityStore",
    "KeystoreConfig",
    "MemoryQueue",
    "MessageQueue",
    "OnboardingConfig",
    "Pkcs11DeviceKeys",
    "RenewalState",
    "Session",
    "SessionState",
    "load_config",
    "read_status",
    "system_metrics",
]
