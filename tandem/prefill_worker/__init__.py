"""The prefill worker: computes prompts and hands their KV to decode workers."""
