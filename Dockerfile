# syntax=docker/dockerfile:1
# The operator's image: `docker build -t idm-backup-operator:0.1.0 .`
#
# Two stages: python-ldap ships no wheels, so it is compiled in the builder (gcc, OpenLDAP and SASL
# headers); the final image gets the virtualenv and only the runtime libraries, plus gpg for encryption.
# Pinned to Debian bookworm: the runtime library package names (libldap-2.5-0) are release-specific.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libldap2-dev libsasl2-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, so a code change does not rebuild python-ldap.
COPY pyproject.toml ./
RUN mkdir -p operator/idm_backup_operator \
    && touch operator/idm_backup_operator/__init__.py \
    && pip install . \
    && pip uninstall -y idm-backup-operator
COPY operator ./operator
RUN pip install --no-deps . \
    && idm-backup-operator --version

FROM ${PYTHON_IMAGE}
# gnupg: gpg and gpgconf (streaming encryption to public keys); libldap/libsasl: python-ldap at runtime.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gnupg libldap-2.5-0 libsasl2-2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
# A fixed non-root uid/gid (the Helm chart runs as 65532 with a read-only root filesystem; TMPDIR and
# HOME point to its /tmp emptyDir). USER: kopf names itself with getpass.getuser(), which falls back to
# the passwd entry, and a platform that picks an arbitrary uid (OpenShift) leaves none.
RUN groupadd --gid 65532 operator \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin operator
ENV PATH=/opt/venv/bin:$PATH \
    USER=operator \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080 9090
ENTRYPOINT ["idm-backup-operator"]
CMD ["run"]
