"""The coordinator daemon's moving parts: the MQTT bridge, ingest of device messages, the
capacity writer, control messages to devices, leadership among replicas, the dispatcher that
hands planned tasks to devices, and liveness (devices that went silent)."""
