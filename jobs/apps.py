from django.apps import AppConfig

from providers.leases import machine_leases_register


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs and leases"

    def ready(self) -> None:
        # providers asks for the leases on its machines through this port (providers.leases);
        # jobs.services needs the app registry ready (it imports models).
        from jobs.services import MachineLeases

        machine_leases_register(MachineLeases())
