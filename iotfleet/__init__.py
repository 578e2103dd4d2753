"""iotfleet: the shared contract of the platform's services.

Only what two or more services use lives here: the device-type catalogue, the
topic scheme, settings, the InfluxDB client, the dynamic-security helpers, the
service lifecycle helper, plus the ``iotfleet`` CLI and the stack supervisor.
"""

from iotfleet.errors import (
    ConfigError,
    IotfleetError,
    PayloadError,
    StackError,
    TopicError,
    UnknownDeviceTypeError,
)

__all__ = [
    "ConfigError",
    "IotfleetError",
    "PayloadError",
    "StackError",
    "TopicError",
    "UnknownDeviceTypeError",
]
__version__ = "0.1.0"
