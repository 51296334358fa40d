"""The data stages: ingest, clean, the schema's compiled rules, validation, split, and batches arriving in the landing folder."""
