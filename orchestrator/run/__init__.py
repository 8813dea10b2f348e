"""A run on disk and on the cluster: the run directory and stage table, atomic files, manifests,
stage identity, running one stage, MLflow tracking and the Ray connection."""
