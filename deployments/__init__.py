"""Deployments of this package's flows on the VM's Prefect server (see prefect.yaml)."""
