# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""Inventory group names from registry names.

Ansible group names must be valid variable names (letters, digits, ``_``; not starting
with a digit). Registry names may hold ``-`` and ``.`` (``api-server``, ``prod.eu``), so
every character outside ``[A-Za-z0-9_]`` becomes ``_``: ``service_api_server``,
``network_prod_eu``. The prefix always starts with a letter. This is done by the plugin
itself, whatever ``TRANSFORM_INVALID_GROUP_CHARS`` says, so the names never change with
the controller's configuration.
"""

from __future__ import annotations

import re

__all__ = ["group_name"]

_INVALID = re.compile(r"[^A-Za-z0-9_]")


def group_name(prefix: str, name: str) -> str:
    """``group_name("service", "api-server") == "service_api_server"``."""
    return "%s_%s" % (prefix, _INVALID.sub("_", name))
