"""Federated training on the device: the train and evaluate task handlers, the torch
trainer (loaded only when a training task arrives), named local data sources and update
uploads."""
