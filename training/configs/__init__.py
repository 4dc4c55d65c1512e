"""Training configurations (official-style ymls); see docs/TRAINING.md."""
