"""Shared basics every part uses: params, errors, the data catalog (Layout), names, atomic storage, metrics, fingerprints, the stage table, processes, threads, progress, alerts, PostgreSQL."""
