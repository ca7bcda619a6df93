"""Attention workers: memory-heavy holders of KV that run decode attention for sequences whose
dense layers run on a decode worker (Lamina), each sequence's KV split by token range over
several of them (DistAttention)."""
