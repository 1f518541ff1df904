"""Task generators and exporters (datasets the pipeline stages train and evaluate on)."""
