"""Delivery: routing, policies, the outbox ledger and dispatch (Prefect-free)."""
