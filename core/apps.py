from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "Core"

    def ready(self) -> None:
        from django.core.signals import request_finished

        from core import logcontext

        # A request's log ids (core.logcontext) last until its answer is sent.
        request_finished.connect(logcontext.clear, dispatch_uid="core.logcontext.clear")
