"""The decode worker: adopts prefilled requests into its continuous batch and streams tokens."""
