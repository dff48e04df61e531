"""The names of the inference runtimes (``--backend``), in a module without torch so that the command
line can offer them without importing it; :mod:`medpipe.infer.predictor` runs them."""

BACKENDS = ("auto", "eager", "onnx", "int8", "openvino", "cudagraph")
