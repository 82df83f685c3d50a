"""Serving the face models: the embedded tritonserver (Python backend over onnxruntime on a CPU, over the
models' torch definitions in FP16 on a GPU) and in-process sessions."""
