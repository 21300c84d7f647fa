"""The data-access and support package every function imports."""

import os

# pydantic looks for plugins in the entry points of every installed
# distribution when it builds its first model, which the intake and the
# remediation do at start (their config file checks): ~45 ms of a cold
# start for plugins this system does not have. Set the variable to another
# value to let pydantic load them.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
