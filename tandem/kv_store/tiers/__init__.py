"""Tiers: byte stores for KV objects under content keys (GPU, CPU, SSD, Redis)."""
