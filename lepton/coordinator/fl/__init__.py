"""Federated learning on the coordinator: pure kernels, and the jobs that run them.

Kernels (pure code, no I/O):

- :mod:`.kernels.strategies`: aggregation strategies behind one small interface
  (:class:`~.kernels.strategies.base.Strategy`): FedAvg, FedProx, FedAvgM, FedAdam, coordinate-wise
  median, trimmed mean, Krum/Multi-Krum, a norm-clipping wrapper and central DP;
- :mod:`.kernels.aggregate`: the numpy kernels they share, over named tensors;
- :mod:`.kernels.accountant`: an RDP accountant for the sampled Gaussian mechanism (epsilon spent);
- :mod:`.kernels.selection`: client selection that trades round time against fair participation.

Jobs (see ``docs/federated-learning.md``):

- :mod:`.jobs.spec`: a job's validated config (TOML file or API body);
  :mod:`.jobs.admission`: what jobs may name;
- :mod:`.tables`, :mod:`.store`: jobs, rounds and updates in SQL;
- :mod:`.routes_uploads`: the update upload endpoint; :mod:`.routes_jobs`: start, list,
  inspect, stop jobs;
- :mod:`.jobs.engine`: the crash-safe round engine the leader runs, one
  :class:`~.jobs.runner.JobRunner` per job, holding a :class:`~.jobs.opening.RoundOpener`
  and a :class:`~.jobs.closing.RoundCloser` over the job's state (:mod:`.jobs.progress`);
  :mod:`.jobs.planning`: eligible devices, expected round times from the cost model, train
  task params;
- :mod:`.modelio`: the job's torch model on the coordinator (first weights, central
  evaluation, the final ONNX model); :mod:`.cli`: ``lepton fl``;
- :mod:`.feature`: federated jobs as a coordinator feature (tables, engine, routes).

Updates and weights arrive as ``dict[str, numpy.ndarray]`` (what
:func:`lepton.protocol.weights.decode_weights` returns).

One round with these pieces (the orchestration around them is the coordinator's)::

    from lepton.coordinator.fl.kernels.selection import Candidate, Fairness, select_clients
    from lepton.coordinator.fl.kernels.strategies import ClientUpdate, build
    from lepton.protocol.weights import decode_weights, encode_weights

    strategy = build("fedprox", mu=0.01)            # or build("median", clip_norm=5.0), ...
    chosen = select_clients(candidates, k, over_select=0.3, fairness=Fairness(max_staleness=10),
                            rng=rng)
    params = {**train_params, **strategy.configure_fit(round_no)}   # e.g. prox_mu
    # ...each device's result names its update blob; fetch it by digest, then:
    meta, delta = decode_weights(blob, max_bytes=cap)  # DecodeError -> drop that update
    # keep it only if meta.kind == "update", meta.base == the global digest, meta.round == round
    updates.append(ClientUpdate(device_id=dev, delta=delta,
                                num_examples=output["examples"],
                                metrics={"loss_after": output["loss_after"]}))
    result = strategy.aggregate(global_weights, updates)   # result.rejected names bad updates
    blob = encode_weights(result.weights, kind="weights", round=round_no + 1)
    # persist blob's digest and result.state in one transaction; on restart load_state()

``result.state`` holds float64 optimizer moments and int64 counters; storing it with
``encode_weights(..., kind="weights")`` keeps the counters exact and the moments at float32
precision, which is plenty for them.

Why the kernels are not imported from Flower: ``flwr`` 1.42 installs, but pins much of the
coordinator's stack to narrow ranges (fastapi 0.138, starlette 1.3, uvicorn 0.49,
protobuf < 7, rich < 15, packaging < 26, typer < 0.21, cryptography 50), so installing it
downgrades the coordinator's web stack, and it pulls in grpcio, uv and some 30 packages
for four ~20-line numpy functions. Its ``typer<0.21`` also conflicts with ``amqtt``
>= 0.12 (``typer>=0.24``): asked for both, pip falls back to amqtt 0.11.4. The kernels here
compute the same rules over named tensors, tensor by tensor, and were checked against
``flwr.server.strategy.aggregate`` (``aggregate``, ``aggregate_median``, ``aggregate_krum``,
``aggregate_trimmed_avg``) on random cases in a separate environment. One deliberate
difference: Multi-Krum averages the kept updates unweighted (Flower weights them by the
client-reported example counts, which an attacker can inflate).
"""
