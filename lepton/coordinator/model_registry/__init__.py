"""Models on the coordinator: INT8 quantization with an accuracy gate, the content-addressed
model registry, deploying a registered version to devices (:mod:`.deploy`), its HTTP routes
and its CLI commands.

Heavy dependencies (torch, onnx, onnxruntime) are imported by the modules that need them,
so importing the registry or the routes stays light.
"""
