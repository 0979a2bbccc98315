"""The broker context: the device topic scheme, how rights are expressed to Mosquitto (an ACL file of patterns for
every device, the dynamic security plugin for exceptions), the broker's configuration, and running and
administering a local Mosquitto. See docs/adr/0005-broker-rights.md."""

from warden.broker._config import MosquittoConfig, render_config
from warden.broker._dynsec import (
    CONTROL_TOPIC,
    RESPONSE_TOPIC,
    access_commands,
    hash_password,
    initial_state,
    state_exceptions,
)
from warden.broker._local import BrokerLayout, LocalBroker
from warden.broker._mosquitto import BrokerAdmin, MosquittoProcess, find_dynsec_plugin, find_mosquitto
from warden.broker._rights import ADMIN_USERNAME, acl_file, exception_role, role_name
from warden.broker._topics import (
    DEVICE_PUBLISHES,
    DEVICE_RECEIVES,
    TOPIC_ROOT,
    Access,
    Rights,
    device_topic,
    parse_device_topic,
    rights,
)

__all__ = [
    "ADMIN_USERNAME",
    "CONTROL_TOPIC",
    "DEVICE_PUBLISHES",
    "DEVICE_RECEIVES",
    "RESPONSE_TOPIC",
    "TOPIC_ROOT",
    "Access",
    "BrokerAdmin",
    "BrokerLayout",
    "LocalBroker",
    "MosquittoConfig",
    "MosquittoProcess",
    "Rights",
    "access_commands",
    "acl_file",
    "device_topic",
    "exception_role",
    "find_dynsec_plugin",
    "find_mosquitto",
    "hash_password",
    "initial_state",
    "parse_device_topic",
    "render_config",
    "rights",
    "role_name",
    "state_exceptions",
]
