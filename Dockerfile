# The FaaSTube node controller: one per node, serving the socket that function containers
# mount (see docs/operations.md): the host tier, and a pool per GPU where the container sees
# GPUs (NVIDIA container runtime; the driver's libcuda comes from the host). CUDA is reached
# through cuda-bindings, so the image needs no CUDA toolkit.
#
# The direct links' native pump (controller/pump.py) is compiled in a first stage that has a C
# compiler; the controller's image has none and loads the library from FAASTUBE_NATIVE_DIR.
FROM python:3.12-slim AS pump
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY faastube ./faastube
COPY controller ./controller
COPY shim ./shim
# The folder is made readable by the controller's user first (build() would make a new one 0700).
RUN pip install --no-cache-dir . \
    && mkdir -p /opt/faastube/native && chmod 755 /opt/faastube/native \
    && python -c "from controller import pump; print(pump.build('/opt/faastube/native'))"

FROM python:3.12-slim

WORKDIR /opt/faastube
COPY pyproject.toml README.md ./
COPY faastube ./faastube
COPY controller ./controller
COPY shim ./shim
COPY --from=pump /opt/faastube/native /opt/faastube/native
ENV FAASTUBE_NATIVE_DIR=/opt/faastube/native
# The GPU pools' driver bindings (the pyproject extra "controller-gpu"), pinned to the version
# on the GPU machines we test on (gpu-facts.md).
RUN pip install --no-cache-dir . cuda-bindings==13.3.1 \
    && useradd --system --uid 10001 --no-create-home faastube \
    && mkdir -p /run/faastube && chown faastube /run/faastube

ENV FAASTUBE_SOCKET=/run/faastube/controller.sock
VOLUME ["/run/faastube"]
USER 10001
ENTRYPOINT ["faastube", "controller"]
