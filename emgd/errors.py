"""The exception tree of emgd.

One root, :class:`EmgdError`. Subclasses also inherit the matching builtin so callers may
catch either (``DeviceTimeout`` is a ``TimeoutError``). Retry policies choose by type,
never by message text. Messages say what to do next.
"""

from __future__ import annotations


class EmgdError(Exception):
    """Root of every error emgd raises on purpose."""


class ConfigError(EmgdError, ValueError):
    """A bad configuration key, value, flag or device URL (exit code 2)."""


class MissingDependency(EmgdError, ImportError):
    """An optional dependency is not installed; the message names what to install."""


class DeviceError(EmgdError, OSError):
    """A device could not be opened or was lost."""


class DeviceNotFound(DeviceError, FileNotFoundError):
    """No such port, or no band found."""


class DevicePermission(DeviceError, PermissionError):
    """The OS refused access to the device."""


class DeviceBusy(DeviceError):
    """The device is in use by another process."""


class DeviceTimeout(EmgdError, TimeoutError):
    """A device did not answer in time."""


class LinkLost(DeviceError, ConnectionError):
    """An open link to a band went away (unplug, out of range)."""


class ModelError(EmgdError, ValueError):
    """A model file or model card is missing, malformed, or does not match its graph."""


class EndpointError(EmgdError, OSError):
    """A ZeroMQ endpoint could not be bound or connected (for example, already in use)."""
