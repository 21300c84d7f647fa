"""The baseline: a bare functions-framework http function (cold start and RSS)."""

import functions_framework


@functions_framework.http
def bare(request):
    return {"status": "ok"}
