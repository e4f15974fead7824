from django.apps import AppConfig

from providers.leases import machine_leases_register


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs and leases"

    def ready(self) -> None:
        # providers asks for the leases on its machines through this port (providers.leases);
        # jobs.machine_leases needs the app registry ready (it imports models).
        from jobs.machine_leases import MachineLeases

        machine_leases_register(MachineLeases())
