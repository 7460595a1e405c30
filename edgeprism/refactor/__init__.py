"""Offline refactoring engine (MoE-Prism phase 1): calibrate -> partition -> artifact."""
