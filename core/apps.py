from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "Core"

    def ready(self) -> None:
        from django.core.signals import request_finished
        from django.db.backends.signals import connection_created
        from django.db.models import Field, ForeignObject

        from core import logcontext
        from core.lookups import AnyOf
        from core.timestamps import use_compiled_loader

        # field__any=ids: integer ids as one array parameter (core.lookups).
        Field.register_lookup(AnyOf)
        ForeignObject.register_lookup(AnyOf)  # a relation's lookups are its own, not Field's

        # A request's log ids (core.logcontext) last until its answer is sent.
        request_finished.connect(logcontext.clear, dispatch_uid="core.logcontext.clear")

        # PostgreSQL timestamps read by psycopg's compiled loader (core.timestamps).
        connection_created.connect(use_compiled_loader, dispatch_uid="core.timestamps.use_compiled_loader")
