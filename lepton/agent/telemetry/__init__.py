"""What the device is and can do: board facts, the start-up probe and its measuring
subprocess, capacity reports and when a change is worth reporting."""
