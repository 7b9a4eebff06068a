"""Commands around the pipeline: the CLI, demo, simulator, reconciliation report and bench."""
