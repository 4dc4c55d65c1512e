"""Packaged official test configurations (network blocks of the official test ymls)."""
