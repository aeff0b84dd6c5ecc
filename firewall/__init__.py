"""Inference firewall: an Open Inference Protocol sidecar that protects image classifiers."""
