# One image for every function; the Knative Service picks the function with
# FUNCTION_SOURCE / FUNCTION_TARGET.
#   docker build -t incident-response .
FROM python:3.11.10-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /build
COPY requirements.txt .
# Runtime packages only: the test tools in requirements.txt stay out of the image.
RUN grep -vE '^(pytest|pytest-timeout|schemathesis|ruff)==' requirements.txt > runtime.txt \
 && python -m venv /venv && /venv/bin/pip install -r runtime.txt

FROM python:3.11.10-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app
COPY --from=build /venv /venv
WORKDIR /app
COPY alembic.ini ./
COPY shared ./shared
COPY functions ./functions
COPY migrations ./migrations
ENV PATH=/venv/bin:$PATH PYTHONPATH=/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PORT=8080 FUNCTION_SIGNATURE_TYPE=http
USER 10001
EXPOSE 8080
# Knative sets PORT; THREADS matches the Service's containerConcurrency.
CMD ["sh", "-c", "exec functions-framework --source \"$FUNCTION_SOURCE\" --target \"$FUNCTION_TARGET\" --port \"$PORT\""]
