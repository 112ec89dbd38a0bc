"""Profiling: load a model, list its quantisable layers, quantise, and measure per-layer sensitivity."""
