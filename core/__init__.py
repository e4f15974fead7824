"""What every app shares: the API base classes and error shape, permissions, locks, periodic
tasks, throttling and the operator console's helpers. It imports no app."""
