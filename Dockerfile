# One Dockerfile for every image of the project: the controller images
# (discon-server + a compiled controller) and the manager image.
#
# ./build.sh passes BASE_IMAGE/BUILD_IMAGE: Debian bookworm root file systems
# made here with debootstrap (no registry needed), which already hold what the
# RUN steps below would otherwise install. With a registry, any Debian-based
# image works, e.g.
#   docker build --build-arg BASE_IMAGE=debian:bookworm-slim \
#                --build-arg BUILD_IMAGE=debian:bookworm --target server-default .
# (build/wheels must exist first: ./build.sh makes it.)
ARG BASE_IMAGE=discon-base-runtime:bookworm
ARG BUILD_IMAGE=discon-base-build:bookworm

# --- compile the bundled controllers -----------------------------------------
FROM ${BUILD_IMAGE} AS controllers
RUN command -v gfortran >/dev/null && command -v make >/dev/null || \
    (apt-get update && apt-get install -y --no-install-recommends gcc gfortran libc6-dev make \
     && rm -rf /var/lib/apt/lists/*)
COPY tests/controllers/ /src/controllers/
RUN make -C /src/controllers OUT=/out

# --- Python runtime with discon_manager installed from local wheels ----------
FROM ${BASE_IMAGE} AS runtime
RUN python3 -c "import ensurepip, venv" 2>/dev/null && [ -e /usr/lib/x86_64-linux-gnu/libgfortran.so.5 ] || \
    (apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libgfortran5 \
     && rm -rf /var/lib/apt/lists/*)
RUN useradd --system --uid 10001 --home-dir /opt/controller --shell /usr/sbin/nologin discon
COPY build/wheels/deps/ /wheels/deps/
RUN python3 -m venv /opt/discon \
    && /opt/discon/bin/pip install --no-cache-dir --no-index --find-links /wheels/deps /wheels/deps/*.whl \
    && rm -rf /wheels
COPY build/wheels/app/ /wheels/app/
RUN /opt/discon/bin/pip install --no-cache-dir --no-index --no-deps /wheels/app/*.whl && rm -rf /wheels \
    && /opt/discon/bin/twistd --help >/dev/null
ENV PATH=/opt/discon/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

# --- controller images: the server answers on 8080 with no arguments ----------
# A controller image is this stage plus its library (and input files for v1
# clients, which cannot transfer them) in /opt/controller, and its labels.
FROM runtime AS controller-image
WORKDIR /opt/controller
USER discon
EXPOSE 8080
CMD ["twistd", "--nodaemon", "--pidfile=", "disconserver"]

FROM controller-image AS server-default
COPY --from=controllers /out/libtest_discon.so /opt/controller/
ARG CREATED=unknown
LABEL org.discon.type="controller" \
      org.discon.controller.id="default" \
      org.discon.controller.name="test-discon" \
      org.discon.controller.version="1.0.0" \
      org.discon.controller.description="Test controller (C): counts calls, record 47 = 2 x record 20, failure hooks on record 119" \
      org.discon.controller.library_path="libtest_discon.so" \
      org.discon.controller.proc_name="discon" \
      org.discon.controller.created="${CREATED}" \
      org.discon.controller.ports="{\"internal\": 8080, \"external\": 0}"

FROM controller-image AS server-nrel5mw
COPY --from=controllers /out/libnrel5mw.so /opt/controller/
COPY tests/data/nrel5mw/DISCON.IN /opt/controller/
ARG CREATED=unknown
LABEL org.discon.type="controller" \
      org.discon.controller.id="nrel5mw" \
      org.discon.controller.name="NREL 5-MW baseline" \
      org.discon.controller.version="1.0.0" \
      org.discon.controller.description="NREL 5-MW reference turbine baseline torque and pitch controller (Fortran)" \
      org.discon.controller.library_path="libnrel5mw.so" \
      org.discon.controller.proc_name="DISCON" \
      org.discon.controller.created="${CREATED}" \
      org.discon.controller.ports="{\"internal\": 8080, \"external\": 0}"

# --- the manager ---------------------------------------------------------------
# Runs as root inside its container: it needs the mounted Docker socket.
FROM runtime AS manager
WORKDIR /app
COPY config/ /app/config/
COPY db/ /app/db/
EXPOSE 8080
CMD ["twistd", "--nodaemon", "--pidfile=", "disconmanager", "--config", "/app/config/config.yaml"]
