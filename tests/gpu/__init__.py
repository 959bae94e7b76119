"""Tests that need a real NVIDIA GPU (marker `gpu`); read-only, skipped elsewhere."""
