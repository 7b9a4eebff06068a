"""Native feeds in: verify, normalize and sequence vendor events into canonical change events."""
