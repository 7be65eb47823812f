# The FaaSTube node controller: one per node, serving the socket that function containers
# mount (see docs/operations.md). The GPU tier arrives with the CUDA data plane; this image
# serves the host-memory tier.
FROM python:3.12-slim

WORKDIR /opt/faastube
COPY pyproject.toml README.md ./
COPY faastube ./faastube
COPY controller ./controller
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home faastube \
    && mkdir -p /run/faastube && chown faastube /run/faastube

ENV FAASTUBE_SOCKET=/run/faastube/controller.sock
VOLUME ["/run/faastube"]
USER 10001
ENTRYPOINT ["faastube", "controller"]
