"""Stage 2: federated fine-tuning. One client update and one aggregation serve both engines."""
