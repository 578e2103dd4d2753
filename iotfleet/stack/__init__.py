"""The local stack: generated configs for mosquitto and influxd, supervision, health."""
