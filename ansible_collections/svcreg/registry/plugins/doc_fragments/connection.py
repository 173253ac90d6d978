# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""The registry connection options, documented once for every module and plugin."""

from __future__ import annotations


class ModuleDocFragment:
    # Modules read the environment through the argument spec's env_fallback
    # (module_utils/connection.py); the PLUGINS fragment adds the env entries that
    # inventory and lookup plugins need for get_option().
    DOCUMENTATION = r"""
options:
  url:
    description:
      - The registry's address, C(wss://host:port/) or C(host:port). Plain C(ws://) is refused.
      - If not set, the E(SVCREG_URL) environment variable of the controller is used.
    type: str
  ca_cert:
    description:
      - PEM file with the CA certificate that signed the registry's certificate
        (the C(tls/ca.crt) that C(svcreg init) writes).
      - If not set, E(SVCREG_CA) is used; without either, the system's trusted roots.
    type: path
  token:
    description:
      - Bearer token sent to the registry.
      - If not set, E(SVCREG_TOKEN) is used. Never logged.
    type: str
  client_cert:
    description:
      - PEM client certificate for mutual TLS.
      - If not set, E(SVCREG_CLIENT_CERT) is used.
    type: path
  client_key:
    description:
      - PEM private key of O(client_cert).
      - If not set, E(SVCREG_CLIENT_KEY) is used.
    type: path
  validate_certs:
    description:
      - Check the registry's certificate and host name.
      - Only set to V(false) on a throwaway test setup.
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for the connection and for each answer.
    type: float
    default: 10.0
"""

    PLUGINS = r"""
options:
  url:
    env:
      - name: SVCREG_URL
  ca_cert:
    env:
      - name: SVCREG_CA
  token:
    env:
      - name: SVCREG_TOKEN
  client_cert:
    env:
      - name: SVCREG_CLIENT_CERT
  client_key:
    env:
      - name: SVCREG_CLIENT_KEY
"""
