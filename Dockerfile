# syntax=docker/dockerfile:1
# One image for every function; the Knative Service picks the function with
# FUNCTION_SOURCE / FUNCTION_TARGET. Build it with `make image` (docker,
# podman or buildah, whichever is present), or by hand:
#   docker build -t incident-response .
#   docker build --build-arg BASE_IMAGE=mirror.example.com/python:3.11-slim-bookworm \
#     --secret id=ca,src=/etc/ssl/certs/corporate-ca.pem -t incident-response .
# BASE_IMAGE must provide python3 (with venv) as `python`; the build and the
# runtime stage use the same one, so the virtualenv's interpreter exists.
ARG BASE_IMAGE=python:3.11.10-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /build
COPY requirements.txt .
# Runtime packages only (requirements-dev.txt holds the test tools), every
# transitive one pinned; pip and setuptools leave once they are done. A CA bundle for a TLS-intercepting proxy or a
# private index comes in as a build secret: mounted for this step, never
# written to a layer.
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python -m venv /venv && /venv/bin/pip install --no-compile -r requirements.txt \
 && /venv/bin/pip uninstall --quiet -y pip setuptools \
 && /venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /venv
WORKDIR /app
COPY alembic.ini ./
COPY shared ./shared
COPY functions ./functions
COPY migrations ./migrations
# A cold start imports compiled code: /app is read-only at run time, so
# nothing compiled later could be kept anyway. unchecked-hash .pyc files do
# not depend on file times, which image layers do not promise to keep.
RUN python -m compileall -q -j 0 --invalidation-mode unchecked-hash /app

FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app
COPY --from=build /venv /venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/venv/bin:$PATH PYTHONPATH=/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PORT=8080 FUNCTION_SIGNATURE_TYPE=http
USER 10001
EXPOSE 8080
# Knative sets PORT; THREADS matches the Service's containerConcurrency.
CMD ["python", "-m", "shared.serve"]
