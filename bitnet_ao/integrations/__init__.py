"""Integrations of bitnet_ao with training frameworks."""
