"""Where the escrow and its token live on each chain, and the idempotent deployment that puts them there.

Addresses come from, in order:
1. the environment (settings ESCROW_ADDRESS and TOKEN_ADDRESS, with ESCROW_DEPLOYMENT_BLOCK for
   the block to scan events from): production, where the contracts are deployed once, on purpose;
2. the deployment file GPGPU_VAR_DIR/chain/deployment-<chain id>.json written by
   `manage.py chain_deploy`: development, tests and the demo.

    deployment = deployment_load(chain_id=client.chain_id())   # None if nothing is recorded
    deployment = deployment_require(client)                      # or DeploymentMissing
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eth_utils import is_address, to_checksum_address

from billing.chain.client import ChainClient, Receipt
from billing.chain.errors import ChainConfigurationError, ChainError
from billing.contract import ESCROW, STABLECOIN, load_artifact

logger = logging.getLogger(__name__)

# Chains where real money lives: a mock token (mintable by anyone) is never deployed there.
PUBLIC_MAINNET_CHAIN_IDS = frozenset({1, 10, 56, 100, 137, 324, 8453, 42161, 43114, 59144})


class DeploymentMissing(ChainError):
    """No escrow is recorded for this chain (run `manage.py chain_deploy`) or it has no code there."""


@dataclass(frozen=True)
class Deployment:
    """The escrow and token of one chain. `source` is "env" or the file it was read from."""

    chain_id: int
    escrow: str
    token: str
    deployment_block: int
    dev_token: bool = False
    treasury: str | None = None
    fee_bps: int | None = None
    # escrow_build() of the artifact it was deployed from ("" in files written before it was kept).
    escrow_build: str = ""
    source: str = "file"

    def as_json(self) -> dict[str, Any]:  # the JSON of the deployment file
        data = asdict(self)
        data.pop("source")
        return data


@functools.cache
def escrow_build() -> str:
    """The committed escrow artifact's identity: sha256 of its creation bytecode (ABI and code).
    A file deployment records it, so an escrow deployed from another version of the contract (a
    development chain kept across an upgrade) is noticed instead of called with an ABI it lacks."""
    return hashlib.sha256(load_artifact(ESCROW).bytecode.encode()).hexdigest()


def _stale(deployment: Deployment) -> bool:
    """A file deployment whose escrow was built from another version of the contract (an env one is
    the operator's choice and is not judged)."""
    return deployment.source != "env" and deployment.escrow_build != escrow_build()


def _stale_message(deployment: Deployment) -> str:
    return (
        f"the escrow recorded in {deployment.source} ({deployment.escrow}) was deployed from another version of "
        "contracts/GpgpuEscrow.sol than the committed build"
    )


def deployment_path(chain_id: int, *, directory: Path | None = None) -> Path:
    """The deployment file of `chain_id` (under GPGPU_VAR_DIR/chain/ unless `directory` is given)."""
    if directory is None:
        from django.conf import settings

        directory = Path(settings.VAR_DIR) / "chain"
    return directory / f"deployment-{chain_id}.json"


def _address(value: str, *, setting: str) -> str:
    if not isinstance(value, str) or not is_address(value):
        raise ChainConfigurationError(f"{setting}={value!r} is not an address")
    return to_checksum_address(value)


def deployment_from_env(chain_id: int, *, escrow: str, token: str, deployment_block: int) -> Deployment | None:
    """The deployment given by ESCROW_ADDRESS (with TOKEN_ADDRESS); None when ESCROW_ADDRESS is unset.

    TOKEN_ADDRESS alone is no deployment: it names the stablecoin `chain_deploy` deploys an escrow
    for. Raises ChainConfigurationError when ESCROW_ADDRESS lacks TOKEN_ADDRESS or one is not an address.
    """
    if not escrow:
        return None
    if not token:
        raise ChainConfigurationError("TOKEN_ADDRESS must be set together with ESCROW_ADDRESS")
    return Deployment(
        chain_id=chain_id,
        escrow=_address(escrow, setting="ESCROW_ADDRESS"),
        token=_address(token, setting="TOKEN_ADDRESS"),
        deployment_block=deployment_block,
        source="env",
    )


def deployment_load(chain_id: int, *, path: Path | None = None, use_env: bool = True) -> Deployment | None:
    """The deployment of `chain_id`: from the environment settings if set, else from its file, else None.

    Raises ChainConfigurationError for a malformed file or env value.
    """
    if use_env:
        from django.conf import settings

        from_env = deployment_from_env(
            chain_id,
            escrow=settings.ESCROW_ADDRESS,
            token=settings.TOKEN_ADDRESS,
            deployment_block=settings.ESCROW_DEPLOYMENT_BLOCK,
        )
        if from_env is not None:
            return from_env
    file = path or deployment_path(chain_id)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ChainConfigurationError(f"cannot read the deployment file {file}: {error}") from None
    try:
        if int(data["chain_id"]) != chain_id:
            raise ChainConfigurationError(f"{file} records chain {data['chain_id']}, not {chain_id}")
        return Deployment(
            chain_id=chain_id,
            escrow=_address(data["escrow"], setting=f"{file}: escrow"),
            token=_address(data["token"], setting=f"{file}: token"),
            deployment_block=int(data["deployment_block"]),
            dev_token=bool(data.get("dev_token", False)),
            treasury=data.get("treasury"),
            fee_bps=data.get("fee_bps"),
            escrow_build=str(data.get("escrow_build", "")),
            source=str(file),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ChainConfigurationError(f"malformed deployment file {file}: {error!r}") from None


def deployment_save(deployment: Deployment, *, path: Path | None = None) -> Path:
    """Write `deployment` to its file atomically (a reader never sees half a file); return the path."""
    file = path or deployment_path(deployment.chain_id)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(deployment.as_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, file)
    return file


def deployment_is_live(client: ChainClient, deployment: Deployment) -> bool:
    """Whether both recorded contracts have code on the client's chain (a reset dev chain has none)."""
    return bool(client.code_at(deployment.escrow)) and bool(client.code_at(deployment.token))


def deployment_require(client: ChainClient, *, path: Path | None = None) -> Deployment:
    """The live deployment of the client's chain; raises DeploymentMissing naming the fix otherwise."""
    chain_id = client.chain_id()
    deployment = deployment_load(chain_id, path=path)
    if deployment is None:
        raise DeploymentMissing(
            f"no escrow recorded for chain {chain_id}: run `manage.py chain_deploy` or set ESCROW_ADDRESS/TOKEN_ADDRESS"
        )
    if not deployment_is_live(client, deployment):
        raise DeploymentMissing(
            f"no contract code at the recorded escrow/token on chain {chain_id} ({deployment.source})"
        )
    if _stale(deployment):
        raise DeploymentMissing(f"{_stale_message(deployment)}: run `manage.py chain_deploy` to deploy the current one")
    return deployment


def _deploy(client: ChainClient, name: str, *args: Any) -> Receipt:  # the constructor's ABI arguments
    artifact = load_artifact(name)
    constructor = client.web3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode).constructor(*args)
    sent = client.transact(constructor)
    return client.wait_confirmations(client.wait_receipt(sent.hash))


def deployment_ensure(
    *,
    client: ChainClient,
    treasury: str,
    fee_bps: int,
    token: str | None = None,
    dev_token: bool = False,
    path: Path | None = None,
) -> tuple[Deployment, bool]:
    """Make sure the client's chain has an escrow, with the client's account as admin and operator.

    Idempotent: when a recorded (or env-given) deployment has code on the chain, nothing is sent
    and `(deployment, False)` is returned. A recorded development deployment (mock token) built
    from another version of the contract is replaced; one on a real token is refused (its funds
    are real: settle and release them on the old escrow, then deploy on purpose). Otherwise
    deploys MockStablecoin (only when `dev_token`;
    else `token` must be an existing ERC-20), then GpgpuEscrow(token, admin=operator, treasury,
    fee_bps), grants OPERATOR_ROLE to the operator, records the file and returns `(deployment, True)`.
    Raises ChainConfigurationError for unusable arguments, ChainError subclasses for chain failures.
    """
    chain_id = client.chain_id()
    existing = deployment_load(chain_id, path=path)
    if existing is not None and deployment_is_live(client, existing):
        if not _stale(existing):
            return existing, False
        if not existing.dev_token:
            raise ChainConfigurationError(
                f"{_stale_message(existing)}; it holds a real token: settle and release everything on it, "
                f"then move {existing.source} away and deploy again"
            )
        logger.warning("%s; deploying the current one", _stale_message(existing))
    if existing is not None and existing.source == "env":
        raise ChainConfigurationError(
            f"ESCROW_ADDRESS/TOKEN_ADDRESS have no contract code on chain {chain_id}; unset them to deploy"
        )
    treasury = _address(treasury, setting="CHAIN_TREASURY_ADDRESS")
    if not 0 <= fee_bps <= 10_000:
        raise ChainConfigurationError(f"PLATFORM_FEE_BPS={fee_bps} must be 0-10000")
    if dev_token:
        if chain_id in PUBLIC_MAINNET_CHAIN_IDS:
            raise ChainConfigurationError(f"refusing to deploy a mintable mock token on public chain {chain_id}")
        token_address = _deploy(client, STABLECOIN).contract_address
    elif token:
        token_address = _address(token, setting="TOKEN_ADDRESS")
        if not client.code_at(token_address):
            raise ChainConfigurationError(f"no contract code at token {token_address} on chain {chain_id}")
    else:
        raise ChainConfigurationError("give the stablecoin's address (--token) or deploy the mock one (--dev-token)")
    assert token_address is not None
    receipt = _deploy(client, ESCROW, token_address, client.address, treasury, fee_bps)
    escrow_address = receipt.contract_address
    assert escrow_address is not None
    escrow = client.contract(ESCROW, escrow_address)
    operator_role = client.call(escrow.functions.OPERATOR_ROLE())
    if not client.call(escrow.functions.hasRole(operator_role, client.address)):
        client.wait_receipt(client.transact(escrow.functions.grantRole(operator_role, client.address)).hash)
    deployment = Deployment(
        chain_id=chain_id,
        escrow=to_checksum_address(escrow_address),
        token=to_checksum_address(token_address),
        deployment_block=receipt.block_number,
        dev_token=dev_token,
        treasury=treasury,
        fee_bps=fee_bps,
        escrow_build=escrow_build(),
    )
    saved = deployment_save(deployment, path=path)
    return Deployment(**{**deployment.as_json(), "source": str(saved)}), True
