"""Serving: inference backends (PyTorch run directory or ONNX file), the HTTP service, its client."""
