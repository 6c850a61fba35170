"""Reading datasets, splitting them over clients, and loading images for training."""
