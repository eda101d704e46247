FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN useradd --create-home --uid 10001 tokens
COPY pyproject.toml README.md ./
COPY client ./client
COPY worker ./worker
COPY tasks ./tasks
COPY models ./models
COPY accounting ./accounting
COPY migrations ./migrations
COPY beat_schedule.py ./
# one pip call: the worker's dependency on token-worker-client resolves to ./client
RUN pip install ./client '.[ops]'
USER tokens
CMD ["celery", "-A", "worker", "worker", "-l", "INFO"]
