"""The model runtime: models, weight loading, tokenizer, paged KV cache, scheduler, sampler.

Knows nothing of Ray, gRPC or the KV store's tiers.
"""
