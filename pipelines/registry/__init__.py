"""The registry: the MLflow store, champion and challenger under a lock, promotion and its evidence, lineage, reproduce and model cards."""
