# The marketplace image: web (gunicorn), Celery worker and beat, and the simulated fleet all
# run from it with different commands (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GPGPU_VAR_DIR=/var/lib/gpgpu \
    STATIC_ROOT=/app/staticfiles

RUN useradd --create-home --uid 10001 --user-group gpgpu
WORKDIR /app

# Dependencies first, so a code change does not reinstall them.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY . .
# Static files (admin, API docs) are collected into the image and served by WhiteNoise.
# The var dir (and its demo/ and beat/ subfolders, volumes in docker-compose) belongs to the app user.
RUN python manage.py collectstatic --noinput -v 0 \
    && mkdir -p "$GPGPU_VAR_DIR/demo" "$GPGPU_VAR_DIR/beat" \
    && chown -R gpgpu:gpgpu "$GPGPU_VAR_DIR"

USER gpgpu
EXPOSE 8000
CMD ["gunicorn", "marketplace.wsgi", "--bind", "0.0.0.0:8000", "--workers", "3", "--access-logfile", "-"]
