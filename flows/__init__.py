"""Prefect flows of adapterflow."""
