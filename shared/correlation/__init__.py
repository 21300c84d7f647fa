"""Correlation: related alerts become members of one incident.

- rules: the rules as data (correlation.yaml), validated at load
- topology: where a pod runs and what owns it, from the Kubernetes API
  and/or kube-state-metrics in Prometheus
- plan: what each alert offers (``provides``) and looks for (``seeks``),
  and its rank as a root, decided before the transaction (no topology call
  is ever made inside one)
- store: the joins, take-overs and merges, inside the ingest transaction
- replay: the noise-control sweep's replays, correlated like fresh alerts
"""
