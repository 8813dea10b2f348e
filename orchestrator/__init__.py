"""The system around imitate_nat: job spec, stages, Ray Train/actors/Tune/Serve, MLflow, CLI."""
