"""manage.py chain_deploy: deploy the escrow (and in development the mock stablecoin) once; print the addresses."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.chain.client import chain_client_from_settings
from billing.chain.deployment import deployment_ensure
from billing.chain.errors import ChainError


class Command(BaseCommand):
    help = (
        "Deploy GpgpuEscrow on CHAIN_RPC_URL with the operator as admin and operator, and record its "
        "address in GPGPU_VAR_DIR/chain/deployment-<chain id>.json. Does nothing when the recorded "
        "contracts (or ESCROW_ADDRESS/TOKEN_ADDRESS) have code on the chain. The mock stablecoin is "
        "deployed with --dev-token or in DEBUG, unless a token is given (--token or TOKEN_ADDRESS)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dev-token", action="store_true", help="deploy MockStablecoin as the token (development)")
        parser.add_argument(
            "--token", default="", help="an existing ERC-20 stablecoin's address (default TOKEN_ADDRESS)"
        )
        parser.add_argument("--treasury", default="", help="fee recipient (default CHAIN_TREASURY_ADDRESS)")
        parser.add_argument("--fee-bps", type=int, default=None, help="platform fee (default PLATFORM_FEE_BPS)")
        parser.add_argument("--json", action="store_true", help="print the deployment as one JSON object")

    def handle(self, *args: Any, **options: Any) -> None:  # BaseCommand.handle's signature
        token = options["token"] or settings.TOKEN_ADDRESS
        # An existing token (--token or TOKEN_ADDRESS) always wins over the mock one.
        dev_token = (options["dev_token"] or settings.DEBUG) and not token
        fee_bps = settings.PLATFORM_FEE_BPS if options["fee_bps"] is None else options["fee_bps"]
        try:
            client = chain_client_from_settings()
            treasury = (
                options["treasury"] or settings.CHAIN_TREASURY_ADDRESS or (client.address if settings.DEBUG else "")
            )
            if not treasury:
                raise CommandError("set CHAIN_TREASURY_ADDRESS (or --treasury): where platform fees are paid")
            deployment, created = deployment_ensure(
                client=client, treasury=treasury, fee_bps=fee_bps, token=token or None, dev_token=dev_token
            )
        except ChainError as error:
            raise CommandError(str(error)) from error
        if options["json"]:
            self.stdout.write(json.dumps({**deployment.as_json(), "created": created, "source": deployment.source}))
            return
        self.stdout.write(("Deployed" if created else "Already deployed") + f" on chain {deployment.chain_id}:")
        self.stdout.write(f"  escrow  {deployment.escrow}")
        self.stdout.write(f"  token   {deployment.token}" + ("  (mock stablecoin)" if deployment.dev_token else ""))
        self.stdout.write(f"  block   {deployment.deployment_block}")
        self.stdout.write(f"  record  {deployment.source}")
