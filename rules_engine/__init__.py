"""The rules engine: readings in, commands and alerts out, over MQTT."""
