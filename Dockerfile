# Relay: one image for the scheduler, the workers and Flower (docker-compose.yml picks the command).
#
#   docker build -t relay:cpu .                                # CPU-only PyTorch (the default)
#   docker build --build-arg TORCH_VARIANT=cu126 -t relay:cu126 .   # CUDA 12.6 PyTorch
#   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t relay:pypi .  # PyPI's torch (CUDA, 6 GB)
#
# TORCH_VARIANT names a PyTorch wheel index (https://download.pytorch.org/whl/<variant>): cpu, cu126, ...
# TORCH_INDEX_URL replaces that index (a mirror, PyPI); BASE_IMAGE replaces python:3.11-slim (a
# mirror of it).
#
# One stage: a separate build stage would leave out only the project's sources (/src, some
# hundred KB), and copying the environment out of it writes its GBs a second time (minutes).

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RELAY_STORAGE=/storage \
    TORCH_HOME=/storage/torch

# uid 10001: above any host's ordinary users, so the shared storage's owner is unambiguous.
RUN groupadd --gid 10001 relay \
 && useradd --uid 10001 --gid relay --create-home --shell /usr/sbin/nologin relay \
 && mkdir -p /storage /data \
 && chown relay:relay /storage

# Torch first and alone, from the index of the chosen variant: PyPI's default torch wheel carries
# several GB of CUDA libraries that a CPU worker never uses. The project's own pin (torch==2.14.1)
# is then already satisfied by the local build (2.14.1+cpu), so `pip install .` keeps it. The
# environment is root's: the relay user runs it and cannot change it.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        torch==2.14.1 torchvision==0.29.1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY segmodel ./segmodel
COPY worker ./worker
COPY scheduler ./scheduler
# Flower is the queue's web monitor (the `flower` service); the project itself does not import it.
# PIP_INDEX_URL, if given, replaces PyPI for these (a mirror).
ARG PIP_INDEX_URL
RUN pip install --no-cache-dir . flower==2.2.0

# Set only now: pip compiles the environment's bytecode above, so processes start without
# compiling torch; at run time nothing writes any (/opt/venv is not the relay user's).
ENV PYTHONDONTWRITEBYTECODE=1

# Numeric, so that runtimes that check for a non-root user (runAsNonRoot) can.
USER 10001:10001
WORKDIR /home/relay
EXPOSE 8000 5555

# Exec form: the command is PID 1's child under `init: true` (or PID 1 itself), so SIGTERM reaches
# Celery and starts its warm shutdown (the running chunk finishes and commits).
CMD ["relay", "worker", "--queues", "cpu"]
