"""A simulated provider fleet that speaks the agent API, for demos and end-to-end tests.

fleet.py: machines that register, heartbeat fake GPUs and run leases; owner_usage.py: when the
GPUs' owners use them, fitted to real traces by trace_params.py; __main__.py: the command line.
It imports nothing from the Django apps: it talks to the marketplace over HTTP only.
"""
