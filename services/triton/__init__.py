"""Serving the ONNX models: the embedded tritonserver (Python backend over ORT) and in-process sessions."""
