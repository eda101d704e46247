FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN useradd --create-home --uid 10001 tokens
# Dependencies first, at the versions the tests ran on (requirements.lock, refreshed by
# `make lock`), in a layer that changes only when the lock does.
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY pyproject.toml README.md ./
COPY client ./client
COPY worker ./worker
COPY tasks ./tasks
COPY models ./models
COPY accounting ./accounting
COPY migrations ./migrations
COPY beat_schedule.py ./
# The worker's distribution carries its client (client/src/token_worker_client) itself.
RUN pip install --no-deps '.' && pip check
# With no TOKENS_* set, `python -m worker.embedded run` keeps the embedded PostgreSQL and Valkey
# in ./var: it must be writable by the user the image runs as.
RUN install -d -o tokens -g tokens /app/var
USER tokens
# Worker metrics (TOKENS_METRICS_PORT) and Flower.
EXPOSE 9808 5555
CMD ["celery", "-A", "worker", "worker", "-l", "INFO"]
