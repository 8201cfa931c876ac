# The LongServe engine image: `longserve serve` (the engine pod) and `longserve download` (the weights Job).
#
# Build it with `make image` (VARIANT=gpu|cpu IMAGE=name:tag): it first fills build/wheelhouse-VARIANT on the
# build host (tools/wheelhouse.sh), then runs docker or buildah on this file. The build is hermetic: it installs
# with `--no-index` from that wheelhouse only, so it needs no network (CI builds it with `--network none`).
#
# Build arguments:
#   BASE_IMAGE  an image with CPython 3.11 (the wheelhouse's Python) and, for the GPU variant, a C compiler and
#               the Python headers (Triton builds its small CUDA launcher module on first use).
#   VARIANT     gpu (CUDA torch from the package index) or cpu (the CPU build of torch); it must match the
#               wheelhouse, which the install stage checks.
#   VERSION, REVISION   the OCI version and source-revision labels (`make image` passes the package version
#               and `git rev-parse HEAD`).
ARG BASE_IMAGE=python:3.11-bookworm
ARG VARIANT=gpu

FROM ${BASE_IMAGE} AS install
ARG VARIANT
COPY build/wheelhouse-${VARIANT} /wheels
# A venv without pip (none is needed at run time); pip itself runs from its wheel in the wheelhouse. The bytecode
# is compiled once here, on every core, so a read-only root filesystem still starts fast (files written for newer
# Pythons, such as torch's py312 test helpers, cannot compile: they are listed and skipped, as pip would).
RUN set -eu; \
    python3 -m venv --without-pip /opt/longserve; \
    pipwhl=$(ls /wheels/pip-*.whl); \
    /opt/longserve/bin/python "$pipwhl/pip" install --no-index --find-links /wheels --no-cache-dir \
        --no-compile --disable-pip-version-check --quiet "longserve[server]"; \
    { /opt/longserve/bin/python -m compileall -q -j 0 /opt/longserve/lib || true; } | grep '^\*\*\* Error' || true; \
    /opt/longserve/bin/python -c "import sys, torch; cuda = torch.version.cuda is not None; \
want = '${VARIANT}' == 'gpu'; \
sys.exit(0 if cuda == want else 'torch %s does not match VARIANT=${VARIANT}' % torch.__version__)"; \
    /opt/longserve/bin/longserve --help > /dev/null

FROM ${BASE_IMAGE} AS runtime
# A fixed non-root uid/gid: the rendered pods run as 10001:10001 (runAsNonRoot with a numeric user).
RUN groupadd --gid 10001 longserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin longserve
COPY --from=install /opt/longserve /opt/longserve
# HOME and the caches live under /tmp so the root filesystem can be mounted read-only (pods mount /tmp).
ENV PATH=/opt/longserve/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TRITON_CACHE_DIR=/tmp/triton
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["longserve"]
CMD ["--help"]
# Last, so that a new revision leaves every layer above in the build cache.
ARG VERSION=0.0.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="longserve" \
      org.opencontainers.image.description="Serve 1M-token-context LLMs: the LongServe engine and weights downloader" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/longserve/longserve" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV LONGSERVE_IMAGE_VERSION=${VERSION}

FROM runtime AS cpu

FROM runtime AS gpu
# Asks the NVIDIA container runtime for the devices and the driver's compute libraries.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM ${VARIANT}
