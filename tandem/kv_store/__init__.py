"""The KV store: the KV object format (header, checksum) that storage and transports share."""
