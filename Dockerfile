# The FaaSTube node controller: one per node, serving the socket that function containers
# mount (see docs/operations.md): the host tier, and a pool per GPU where the container sees
# GPUs (NVIDIA container runtime; the driver's libcuda comes from the host). CUDA is reached
# through cuda-bindings, so the image needs no CUDA toolkit.
FROM python:3.12-slim

WORKDIR /opt/faastube
COPY pyproject.toml README.md ./
COPY faastube ./faastube
COPY controller ./controller
COPY shim ./shim
# The GPU pools' driver bindings (the pyproject extra "controller-gpu"), pinned to the version
# on the GPU machines we test on (gpu-facts.md).
RUN pip install --no-cache-dir . cuda-bindings==13.3.1 \
    && useradd --system --uid 10001 --no-create-home faastube \
    && mkdir -p /run/faastube && chown faastube /run/faastube

ENV FAASTUBE_SOCKET=/run/faastube/controller.sock
VOLUME ["/run/faastube"]
USER 10001
ENTRYPOINT ["faastube", "controller"]
