"""``lepton-demo``: the whole loop on one machine.

A broker (:mod:`.broker`), a coordinator and a simulated fleet run as separate processes
(:mod:`.stack`); :mod:`.loop` drives them through the coordinator's HTTP API and the model
registry (train, quantize, deploy, infer, federated rounds, redeploy); :mod:`.report` shows
progress and writes the HTML and JSON reports; :mod:`.cli` is the command.
"""
