FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN useradd --create-home --uid 10001 tokens
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
COPY models ./models
COPY accounting ./accounting
COPY migrations ./migrations
COPY beat_schedule.py ./
RUN pip install '.[ops]'
USER tokens
CMD ["celery", "-A", "worker", "worker", "-l", "INFO"]
