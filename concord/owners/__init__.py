"""The owners' side: exception queues, actions on them, and the `concord exceptions` command."""
