"""Structured outputs and tool calling: constraints compiled by llguidance, applied as per-row token masks."""
