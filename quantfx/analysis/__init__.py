"""Diagnostics over quantized models (precision check)."""
