"""Concord: keeps CRM, dispatch and billing in agreement on one Kafka stream-processing pipeline."""
