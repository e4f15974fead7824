"""manage.py chain_dev_fund: development money on a local chain (mock stablecoin only, DEBUG only)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from eth_utils import is_address, to_checksum_address
from web3.contract import Contract

from billing.chain.client import ChainClient, chain_client_from_settings, key_file_create, key_file_read
from billing.chain.deployment import deployment_require
from billing.chain.errors import ChainError
from billing.contract import ESCROW, STABLECOIN

MAX_TOKENS = Decimal(10**12)
GAS_TOP_UP_WEI = 10**18
GAS_LOW_WEI = 10**17


def _token_units(raw: str, decimals: int) -> int:
    try:
        amount = Decimal(raw)
    except InvalidOperation:
        raise CommandError(f"--amount {raw!r} is not a number") from None
    if not amount.is_finite() or not 0 < amount <= MAX_TOKENS:
        raise CommandError(f"--amount must be more than 0 and at most {MAX_TOKENS:,} tokens")
    units = amount.scaleb(decimals)
    if units != units.to_integral_value():
        raise CommandError(f"--amount has more than {decimals} decimals")
    return int(units)


class Command(BaseCommand):
    help = (
        "Development only (DEBUG, mock stablecoin): mint tokens to --to, and/or make sure the renter "
        "whose key is in --renter-key-file has at least --amount available in the escrow (gas, mint, "
        "approve and deposit as needed; running it again tops up only the shortfall)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--to", default="", help="mint --amount tokens to this address")
        parser.add_argument("--renter-key-file", type=Path, help="a 0600 file with the renter's hex key")
        parser.add_argument("--create-key", action="store_true", help="create --renter-key-file if missing")
        parser.add_argument("--amount", default="1000", help="tokens (default 1000)")

    def handle(self, *args: Any, **options: Any) -> None:  # BaseCommand.handle's signature
        if not settings.DEBUG:
            raise CommandError("chain_dev_fund is for development chains only: it needs DEBUG=true")
        if not options["to"] and not options["renter_key_file"]:
            raise CommandError("give --to ADDRESS and/or --renter-key-file PATH")
        if options["to"] and not is_address(options["to"]):
            raise CommandError(f"--to {options['to']!r} is not an address")
        try:
            client = chain_client_from_settings()
            deployment = deployment_require(client)
            if not deployment.dev_token:
                raise CommandError("the recorded token is not the mock stablecoin: nothing to mint")
            token = client.contract(STABLECOIN, deployment.token)
            units = _token_units(options["amount"], client.call(token.functions.decimals()))
            if options["to"]:
                to = to_checksum_address(options["to"])
                client.wait_receipt(client.transact(token.functions.mint(to, units)).hash)
                self.stdout.write(f"Minted {options['amount']} to {to}.")
            if options["renter_key_file"]:
                self._fund_renter(client, deployment.escrow, token, units, options["renter_key_file"], options)
        except ChainError as error:
            raise CommandError(str(error)) from error

    def _fund_renter(
        self, client: ChainClient, escrow_address: str, token: Contract, units: int, key_path: Path, options: dict
    ) -> None:
        if not key_path.exists() and options["create_key"]:
            account = key_file_create(key_path)
            self.stdout.write(f"Created renter key {key_path} (mode 0600).")
        else:
            account = key_file_read(key_path, setting="--renter-key-file")
        renter = client.for_account(account)
        if client.native_balance(account.address) < GAS_LOW_WEI:
            client.wait_receipt(client.send_value(account.address, GAS_TOP_UP_WEI).hash)
        escrow = client.contract(ESCROW, escrow_address)
        available = client.call(escrow.functions.availableBalance(account.address))
        shortfall = units - available
        if shortfall > 0:
            for call in (
                token.functions.mint(account.address, shortfall),
                token.functions.approve(escrow.address, shortfall),
                escrow.functions.deposit(shortfall),
            ):
                renter.wait_receipt(renter.transact(call).hash)
            available = client.call(escrow.functions.availableBalance(account.address))
        self.stdout.write(f"Renter {account.address} has {available} units available in escrow {escrow.address}.")
