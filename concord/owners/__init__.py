"""The owners' side: exception queues and actions, the workspace pages, `concord exceptions` and `checklist`."""
