"""Generated stubs; regenerate with `make proto`."""
