"""Training: the candidate search, where its fits run (this process or Dask), the training run that logs the best model, and DDP."""
