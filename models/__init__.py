"""Bundled protected models, their training scripts and ONNX tooling."""
