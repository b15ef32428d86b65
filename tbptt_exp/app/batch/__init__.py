"""The batch finder: the largest workable batch per k, and the frontier across k."""
