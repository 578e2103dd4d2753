"""The few exception classes shared by every service."""


class IotfleetError(Exception):
    """Base class of every error raised on purpose by iotfleet."""


class ConfigError(IotfleetError):
    """Raised when a setting is invalid; the message names the setting (env var) to change."""


class TopicError(IotfleetError, ValueError):
    """Raised when a topic or a topic segment (device type, device id) is malformed."""


class UnknownDeviceTypeError(IotfleetError, KeyError):
    """Raised when a device type is not in the catalogue."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown device type"


class PayloadError(IotfleetError, ValueError):
    """Raised when a payload cannot be accepted before validation (too large, not UTF-8)."""


class StackError(IotfleetError):
    """Raised when the local stack cannot be started, inspected or stopped."""
