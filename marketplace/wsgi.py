import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
django_application = get_wsgi_application()

# Steady heartbeats are answered before Django's handler (providers/heartbeat_front.py).
from providers.heartbeat_front import SteadyHeartbeats  # noqa: E402 - needs the apps, loaded just above

application = SteadyHeartbeats(django_application)

# What Django made at start (modules, settings, the app registry, models) lives as long as the
# process: frozen, a full garbage collection no longer walks it on some unlucky request. Measured
# on the console's week dashboard (benchmarks/dashboard.py, 10,000 GPUs): without it, one request
# in 30 took 303-317 ms, about 100 ms of it a full collection, the others 127-234; with it, none
# above 224.
gc.freeze()
