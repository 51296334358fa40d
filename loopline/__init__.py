"""loopline's command line, above the three layers it fronts: `flows` (Prefect wiring),
`serving` (the BentoML service and its harness) and `pipelines` (the domain)."""
