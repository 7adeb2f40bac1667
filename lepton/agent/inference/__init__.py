"""Serving models on the device: the deploy and infer task handlers, the model manager
(fetch, verify, cache, swap), runtimes (ONNX Runtime, TFLite/LiteRT), eviction bounds and
the local HTTP endpoint for applications."""
