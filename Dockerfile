# The crdgol image that deploy/ names (ghcr.io/crdgol/crdgol): the `crdgol` command (controller,
# extproc, up, ...) and `python3`, from Debian packages plus the pinned wheels of pyproject.toml.
# Non-root (uid 65532), nothing written outside /tmp at run time (read-only root filesystem ready).
#   make image            # docker or podman build -t ghcr.io/crdgol/crdgol:0.1.0 .
# Built on the development machine with podman (see the README's Image section); not built in CI.
FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto proto
COPY crdgol crdgol
COPY extproc extproc
COPY controller controller
COPY mockllm mockllm
# The generated protobuf code is built here (crdgol/pb is not in the source tree), then the package
# is installed with its pinned dependencies into a venv the runtime stage copies whole.
RUN python3 -m venv /opt/crdgol \
 && /opt/crdgol/bin/pip install --no-cache-dir --disable-pip-version-check "grpcio-tools==1.85.1" \
 && PYTHONPATH=/src /opt/crdgol/bin/python -m crdgol.protogen \
 && /opt/crdgol/bin/pip install --no-cache-dir --disable-pip-version-check /src

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/crdgol /opt/crdgol
ENV PATH=/opt/crdgol/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CRDGOL_LOG_FORMAT=json
USER 65532:65532
WORKDIR /tmp
CMD ["crdgol", "--help"]
