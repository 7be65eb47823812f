# The FaaSTube node controller: one per node, serving the socket that function containers
# mount (see docs/operations.md): the host tier, and a pool per GPU where the container sees
# GPUs (NVIDIA container runtime; the driver's libcuda comes from the host). CUDA is reached
# through cuda-bindings, so the image needs no CUDA toolkit.
#
# The direct links' native pump (controller/pump.py) is compiled in a first stage that has a C
# compiler; the controller's image has none and loads the library from FAASTUBE_NATIVE_DIR.
FROM python:3.12-slim AS pump
# The distribution's packages follow the base image's release; pinning their versions (DL3008)
# breaks the build as soon as the mirror drops that exact version.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md image-constraints.txt ./
COPY faastube ./faastube
COPY controller ./controller
COPY shim ./shim
COPY bench ./bench
# The folder is made readable by the controller's user first (build() would make a new one 0700).
RUN pip install --no-cache-dir -c image-constraints.txt . \
    && mkdir -p /opt/faastube/native && chmod 755 /opt/faastube/native \
    && python -c "from controller import pump; print(pump.build('/opt/faastube/native'))"

FROM python:3.12-slim

WORKDIR /opt/faastube
COPY pyproject.toml README.md image-constraints.txt ./
COPY faastube ./faastube
COPY controller ./controller
COPY shim ./shim
COPY bench ./bench
COPY --from=pump /opt/faastube/native /opt/faastube/native
ENV FAASTUBE_NATIVE_DIR=/opt/faastube/native
# The GPU pools' driver bindings and NVML (the pyproject extra "controller-gpu"), at the
# versions image-constraints.txt pins. User 10001, group 10002: the group function pods join
# to reach the socket (knative/controller-daemonset.yaml, docs/security.md).
RUN pip install --no-cache-dir -c image-constraints.txt ".[controller-gpu]" \
    && groupadd --system --gid 10002 faastube-clients \
    && useradd --system --uid 10001 --gid 10002 --no-create-home faastube \
    && mkdir -p /run/faastube && chown faastube:faastube-clients /run/faastube && chmod 2770 /run/faastube

ENV FAASTUBE_SOCKET=/run/faastube/controller.sock
VOLUME ["/run/faastube"]
USER 10001:10002
ENTRYPOINT ["faastube", "controller"]
