"""Builds the Triton model repository's ONNX files from weights that registry packages ship."""
