"""Trust: who may talk to the coordinator and the broker, and with which rights."""
