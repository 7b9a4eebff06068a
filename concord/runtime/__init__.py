"""The faust runtime: broker lifecycle, the worker app and its stages, the producer and the web pages."""
