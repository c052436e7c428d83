"""Broker administration: the embedded Mosquitto, fleet credentials, ACL and PKI.

`MosquittoBroker` runs the Mosquitto binary as a child process (the embedded default
broker when ``broker.url`` is empty); `render_acl` / `render_password_file` write
Mosquitto files for a fleet; ``credentials`` is the ``classroom-agent broker`` command
(CA, device certificates, passwords, ACL).
"""

from agent.broker.acl import render_acl, render_password_file
from agent.broker.credentials import add_broker_parser
from agent.broker.embedded import BrokerError, BrokerTls, MosquittoBroker
from agent.broker.local import (
    LocalCredentials,
    RoomBroker,
    embedded_password_file,
    local_credentials,
    locked_broker,
)
from agent.broker.pki import CertPair, make_ca, save_pair, sign_certificate, write_cert, write_key

__all__ = [
    "BrokerError",
    "BrokerTls",
    "CertPair",
    "LocalCredentials",
    "MosquittoBroker",
    "RoomBroker",
    "add_broker_parser",
    "embedded_password_file",
    "local_credentials",
    "locked_broker",
    "make_ca",
    "render_acl",
    "render_password_file",
    "save_pair",
    "sign_certificate",
    "write_cert",
    "write_key",
]
