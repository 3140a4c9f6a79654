"""invite-worker: RabbitMQ "invite participants" commands to Microsoft Graph call invites."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("invite-worker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
