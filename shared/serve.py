"""The image's entry point: one function of the image, picked by
``FUNCTION_SOURCE`` / ``FUNCTION_TARGET``, served by gunicorn the way
functions-framework serves it, without gunicorn's control socket.

gunicorn ≥ 24 opens a control socket under ``$HOME/.gunicorn`` (or
``$XDG_RUNTIME_DIR``); in the image ``$HOME`` is the read-only, root-owned
``/app``, so every start logged a ``Permission denied`` ERROR. Nothing
here uses ``gunicornc``, so the socket is switched off. Without the two
variables the container prints one line naming them and exits 2, instead
of functions-framework's traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

REQUIRED = ("FUNCTION_SOURCE", "FUNCTION_TARGET")


def missing(env: Mapping[str, str]) -> list[str]:
    return [name for name in REQUIRED if not env.get(name, "").strip()]


def main(env: Mapping[str, str] = os.environ) -> int:
    absent = missing(env)
    if absent:
        print(f"incident-response: set {' and '.join(absent)} (for example FUNCTION_SOURCE=functions/intake/main.py "
              "FUNCTION_TARGET=intake); the Knative Services set both", file=sys.stderr)
        return 2
    import functions_framework
    from functions_framework._http.gunicorn import GunicornApplication

    app = functions_framework.create_app(env["FUNCTION_TARGET"], env["FUNCTION_SOURCE"],
                                         env.get("FUNCTION_SIGNATURE_TYPE", "http"))
    GunicornApplication(app, "0.0.0.0", int(env.get("PORT", "8080")), False, control_socket_disable=True).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
