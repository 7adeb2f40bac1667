"""Federated learning kernels for the coordinator: pure code, no I/O.

- :mod:`.strategies`: aggregation strategies behind one small interface
  (:class:`~.strategies.base.Strategy`): FedAvg, FedProx, FedAvgM, FedAdam, coordinate-wise
  median, trimmed mean, Krum/Multi-Krum, a norm-clipping wrapper and central DP;
- :mod:`.kernels`: the numpy kernels they share, over named tensors;
- :mod:`.accountant`: an RDP accountant for the sampled Gaussian mechanism (epsilon spent);
- :mod:`.selection`: client selection that trades round time against fair participation.

Updates and weights arrive as ``dict[str, numpy.ndarray]`` (what
:func:`protocol.weights.decode_weights` returns); the round orchestration (selection,
deadlines, persistence, the HTTP and MQTT shells) lives around these pieces.

Why the kernels are not imported from Flower: ``flwr`` 1.42 installs, but pins much of the
coordinator's stack to narrow ranges (fastapi 0.138, starlette 1.3, uvicorn 0.49,
protobuf < 7, rich < 15, packaging < 26, typer < 0.21, cryptography 50), so installing it
downgrades the coordinator's web stack, and it pulls in grpcio, uv and some 30 packages
for four ~20-line numpy functions. Its ``typer<0.21`` also conflicts with ``amqtt``
>= 0.12 (``typer>=0.24``): asked for both, pip falls back to amqtt 0.11.4. The kernels here
compute the same rules over named tensors, tensor by tensor; they were checked against
``flwr.server.strategy.aggregate`` in a separate environment.
"""
