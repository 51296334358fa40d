"""Monitoring: drift, labelled metrics, the retraining policy, the monitoring run and its record, label-free estimates, the Evidently dashboard and the prediction log."""
