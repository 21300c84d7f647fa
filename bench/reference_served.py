"""The reference service (reference_app.py) served as the functions are:
one process, waitress with shared/serve.py's settings, the same thread
turns and the start frozen out of the collector, so the two differ only in
what their handlers do."""

import gc
import os
import sys

from waitress import serve

from reference_app import app
from shared.serve import SWITCH_INTERVAL_SECONDS, server_settings

gc.freeze()
sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
serve(app, **server_settings(os.environ, body_cap=1024 * 1024))
