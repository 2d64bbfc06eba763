"""Thin Python client for the OFA captioning Triton server (placeholder)."""
