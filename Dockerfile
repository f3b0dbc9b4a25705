# Image for the Revline services (worker, sink); see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Copy only what the package needs, so .venv/.revline never enter the build.
COPY pyproject.toml README.md requirements.lock ./
COPY revline ./revline
COPY schemas ./schemas
COPY processors ./processors
COPY sinks ./sinks
COPY streams ./streams
RUN pip install -r requirements.lock \
    && pip install --no-deps . \
    && useradd --system --create-home --uid 10001 revline

USER revline
CMD ["revline", "--help"]
