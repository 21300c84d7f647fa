"""Correlation: related alerts become members of one incident.

- rules: the rules as data (correlation.yaml), validated at load
- topology: where a pod runs and what owns it, from the Kubernetes API
- plan: what each alert offers (``provides``) and looks for (``seeks``),
  decided before the transaction (Kubernetes is never called inside one)
- store: the joins and merges, inside the ingest transaction
"""
