"""iotfleet-broker-agent: the broker-side owner of the device password and ACL files."""
