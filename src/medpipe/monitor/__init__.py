"""Monitoring a model in service: data capture in SageMaker's format, baseline statistics and drift checks."""
