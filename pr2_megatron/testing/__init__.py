"""Test and benchmark support: multi-rank runner and tiny-model helpers."""
