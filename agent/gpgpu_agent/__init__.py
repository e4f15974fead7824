"""The GPGPU provider agent. It imports nothing from the marketplace's Django apps."""

__version__ = "0.1.0"
