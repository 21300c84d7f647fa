"""Deployment tooling: the Knative manifest generator and the table of services it reads."""
