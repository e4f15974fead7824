"""manage.py simulate: replay GPU-cluster traces through a placement policy and print what it
achieved (docs/simulator.md). The last line of output is one JSON object."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from marketplace.placement import POLICIES
from marketplace.simulator.engine import Config, Simulation
from marketplace.simulator.metrics import table
from marketplace.simulator.traces import TraceError, read_duty, read_fleet, read_jobs


def _default(name: str) -> Path:
    return Path(settings.BASE_DIR).parent / "shared" / "data" / "traces" / name


class Command(BaseCommand):
    help = "Replay job, fleet and duty-cycle traces through a placement policy; print the metrics."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--jobs", type=Path, default=_default("openb_pod_list_default.csv"))
        parser.add_argument("--fleet", type=Path, default=_default("openb_node_list_gpu_node.csv"))
        parser.add_argument("--duty", type=Path, default=_default("gpu_duty_cycle_train.csv"))
        parser.add_argument(
            "--load",
            type=float,
            default=None,
            help="Poisson arrivals offering this many times the fleet's mean idle GPUs (default: the trace's own)",
        )
        parser.add_argument("--horizon", type=float, default=3 * 86400.0, help="simulated seconds")
        parser.add_argument("--warmup", type=float, default=6 * 3600.0, help="seconds left out of the metrics")
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--policy", choices=POLICIES, default="v2")
        parser.add_argument(
            "--checkpoint-interval", type=int, default=600, help="seconds, for jobs that declare none; 0 = none"
        )
        parser.add_argument(
            "--checkpoint-on-reclaim",
            type=float,
            default=None,
            help="jobs save within this many seconds of SIGTERM and lose nothing when an owner reclaims",
        )
        parser.add_argument("--max-duration", type=float, default=86400.0, help="longer jobs are skipped")
        parser.add_argument("--cycle", type=float, default=30.0, help="seconds between match cycles")
        parser.add_argument(
            "--owner-drift",
            type=float,
            default=0.0,
            help="seconds: each day of an owner's pattern is shifted by a uniform draw within this, either way",
        )
        parser.add_argument(
            "--no-analogs",
            action="store_true",
            help="v2 forecasts from its stretch statistics alone, without reading the days before",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["horizon"] <= 0 or not 0 <= options["warmup"] < options["horizon"]:
            raise CommandError("need --horizon > 0 and 0 <= --warmup < --horizon")
        if options["load"] is not None and options["load"] <= 0:
            raise CommandError("--load must be > 0")
        if options["checkpoint_interval"] < 0 or options["cycle"] <= 0:
            raise CommandError("--checkpoint-interval must be >= 0 and --cycle > 0")
        if not 0 <= options["owner_drift"] < 43200:
            raise CommandError("--owner-drift must be >= 0 and under 43200 (half a day)")
        started = time.perf_counter()
        try:
            nodes = read_fleet(options["fleet"])
            jobs = read_jobs(options["jobs"])
            duty = read_duty(options["duty"])
        except TraceError as exc:
            raise CommandError(str(exc)) from exc
        config = Config(
            horizon_s=options["horizon"],
            warmup_s=options["warmup"],
            seed=options["seed"],
            policy=options["policy"],
            load=options["load"],
            checkpoint_interval_s=options["checkpoint_interval"],
            checkpoint_on_reclaim_s=options["checkpoint_on_reclaim"],
            max_duration_s=options["max_duration"],
            cycle_s=options["cycle"],
            owner_drift_s=options["owner_drift"],
            analogs=not options["no_analogs"],
        )
        simulation = Simulation(nodes=nodes, jobs=jobs, duty=duty, config=config)
        summary = simulation.run().summary()
        summary["policy"] = config.policy
        summary["load"] = config.load
        summary["seconds"] = round(time.perf_counter() - started, 1)
        self.stdout.write(
            table(
                [
                    ("fleet", f"{len(nodes)} nodes, {sum(n.gpus for n in nodes)} GPUs"),
                    ("mean rentable GPUs", f"{simulation.mean_supply:.0f}"),
                    ("jobs simulated", len(simulation.jobs)),
                    *((key, value) for key, value in summary.items() if key != "never_placed"),
                    ("never_placed", ", ".join(f"{k} {v}" for k, v in summary["never_placed"].items()) or "-"),
                ]
            )
        )
        self.stdout.write(json.dumps(summary, sort_keys=True))
