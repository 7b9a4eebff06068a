"""Concord's stream processors: decode, guard, status table, flow rules, exceptions and audit."""
