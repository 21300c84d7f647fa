"""Loopback stand-ins and process helpers shared by the tests and `make bench`:
a Kubernetes API (`kube`), PagerDuty and Slack receivers that validate what
they get (`notify`), a recording HTTP server and a cuttable TCP proxy
(`servers`), and the functions run as real functions-framework processes
(`processes`). Nothing here listens anywhere but 127.0.0.1."""
