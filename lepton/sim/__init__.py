"""Fleet simulator: many virtual devices, each a real agent with its own MQTT connection,
state directory and outbox, shaped by a device profile (cores, memory, throughput, battery,
thermal behaviour, link quality)."""
