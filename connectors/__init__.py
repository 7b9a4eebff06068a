"""Concord's connectors: native feeds in as canonical change events, commands out to owning systems."""
