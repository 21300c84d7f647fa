"""Local development tooling: `make run`, the local Broker, the demo."""
