"""Ahead-of-time checks of every kernel configuration: aot (one Triton), aot_versions (several), aot_rules."""
