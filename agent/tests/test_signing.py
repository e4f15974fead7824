"""Signed usage reports (EIP-712 through eth-account) and the signing key's file."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from eth_abi import encode
from eth_account.messages import encode_typed_data
from eth_utils import keccak

from gpgpu_agent.protocol import (
    DEFAULT_CHAIN_ID,
    NOT_MEASURED,
    USAGE_REPORT_TYPE,
    UnsignableReport,
    UsageStruct,
    recover_usage_signer,
    usage_signature_valid,
    wire_usage_struct,
)
from gpgpu_agent.signing import KeyFileError, SigningKey, create_key_file, load_key_file, sign_usage

T0 = datetime(2026, 1, 14, 12, 0, 0, tzinfo=UTC)


def struct(**overrides: object) -> UsageStruct:
    values: dict[str, object] = {
        "lease_id": 12,
        "report_id": "12-1768392000",
        "period_start": int(T0.timestamp()),
        "period_end": int(T0.timestamp()) + 60,
        "gpu_milliseconds": 57_345,
        "mean_utilization_bp": 9357,
        "peak_memory_mb": 20480,
    }
    values.update(overrides)
    return UsageStruct(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


# --- signatures -------------------------------------------------------------------------------


def test_signature_recovers_the_signing_address(key: SigningKey) -> None:
    report = struct()

    signature = sign_usage(report, key)

    assert signature.startswith("0x") and len(signature) == 132
    assert recover_usage_signer(report, signature) == key.address
    assert usage_signature_valid(report, signature, address=key.address.lower())


def test_report_survives_the_wire_with_its_signature(key: SigningKey) -> None:
    report = struct()
    body = json.loads(json.dumps({**report.to_wire(), "signature": sign_usage(report, key)}))

    received = wire_usage_struct(12, body)

    assert received == report
    assert recover_usage_signer(received, body["signature"]) == key.address


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gpu_seconds", "57.346"),
        ("period_end", "2026-01-14T12:01:01Z"),
        ("mean_utilization_pct", 93.58),
        ("peak_memory_mb", 20481),
        ("report_id", "12-other"),
    ],
)
def test_a_field_changed_after_signing_no_longer_matches_the_key(key: SigningKey, field: str, value: object) -> None:
    report = struct()
    body = {**report.to_wire(), "signature": sign_usage(report, key)}
    body[field] = value

    assert not usage_signature_valid(wire_usage_struct(12, body), body["signature"], address=key.address)


def test_signature_is_bound_to_the_lease_and_the_chain(key: SigningKey) -> None:
    report = struct()
    signature = sign_usage(report, key)

    assert not usage_signature_valid(struct(lease_id=13), signature, address=key.address)
    assert not usage_signature_valid(report, signature, address=key.address, chain_id=1)


@pytest.mark.parametrize("signature", ["", "0x", "0x1234", "0x" + "zz" * 65, "0x" + "00" * 65, "0x" + "ff" * 65])
def test_malformed_signature_recovers_nobody(signature: str) -> None:
    assert recover_usage_signer(struct(), signature) is None


def test_typed_data_hashes_as_the_documented_struct() -> None:
    """The digest eth-account signs equals EIP-712 computed by hand from the documented type
    string, so a verifier elsewhere (a contract) can rebuild it."""
    report = struct(mean_utilization_bp=None)
    domain_type = b"EIP712Domain(string name,string version,uint256 chainId)"
    domain_hash = keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256"],
            [keccak(domain_type), keccak(b"GPGPU Usage"), keccak(b"1"), DEFAULT_CHAIN_ID],
        )
    )
    struct_hash = keccak(
        encode(
            ["bytes32", "uint256", "bytes32", "uint64", "uint64", "uint256", "uint32", "uint32"],
            [
                keccak(USAGE_REPORT_TYPE.encode()),
                12,
                keccak(b"12-1768392000"),
                report.period_start,
                report.period_end,
                57_345,
                NOT_MEASURED,
                20480,
            ],
        )
    )
    signable = encode_typed_data(full_message=report.typed_data())

    assert USAGE_REPORT_TYPE == (
        "UsageReport(uint256 leaseId,string reportId,uint64 periodStart,uint64 periodEnd,"
        "uint256 gpuMilliSeconds,uint32 meanUtilizationBp,uint32 peakMemoryMb)"
    )
    assert keccak(b"\x19\x01" + domain_hash + struct_hash) == keccak(
        b"\x19" + signable.version + signable.header + signable.body
    )


# --- the rounding rules -------------------------------------------------------------------------


def test_measurements_are_rounded_so_they_map_exactly_onto_the_wire() -> None:
    report = UsageStruct.measure(
        lease_id=12,
        report_id="r",
        period_start=T0.replace(microsecond=700_000),
        period_end=T0.replace(minute=1, microsecond=200_000),
        gpu_seconds=57.3459,
        mean_utilization_pct=93.567,
        peak_memory_mb=20480,
    )

    # Start floored, end ceiled: the period only grows, so the GPU-seconds still fit in it.
    assert (report.period_start, report.period_end) == (int(T0.timestamp()), int(T0.timestamp()) + 61)
    assert report.gpu_milliseconds == 57_345  # rounded down
    assert report.mean_utilization_bp == 9357  # nearest basis point
    assert report.to_wire() == {
        "report_id": "r",
        "period_start": "2026-01-14T12:00:00Z",
        "period_end": "2026-01-14T12:01:01Z",
        "gpu_seconds": "57.345",
        "mean_utilization_pct": 93.57,
        "peak_memory_mb": 20480,
    }


def test_gpu_seconds_are_capped_at_the_period_times_the_gpus() -> None:
    report = UsageStruct.measure(
        lease_id=1,
        report_id="r",
        period_start=T0,
        period_end=T0.replace(second=10),
        gpu_seconds=25.0,
        mean_utilization_pct=None,
        peak_memory_mb=None,
        gpu_count=2,
    )

    assert report.gpu_milliseconds == 20_000
    assert report.message()["meanUtilizationBp"] == NOT_MEASURED
    assert report.to_wire()["mean_utilization_pct"] is None


@pytest.mark.parametrize(
    ("pct", "bp"), [(float("nan"), None), (-3.0, 0), (100.4, 10_000), (0.005, 0), (0.015, 2), (12.345, 1234)]
)
def test_utilisation_is_clamped_and_rounded_to_basis_points(pct: float, bp: int | None) -> None:
    report = UsageStruct.measure(
        lease_id=1, report_id="r", period_start=T0, period_end=T0.replace(second=1), gpu_seconds=1,
        mean_utilization_pct=pct, peak_memory_mb=None,
    )  # fmt: skip

    assert report.mean_utilization_bp == bp


def test_every_basis_point_survives_json_as_a_percentage() -> None:
    for bp in range(0, 10_001):
        body = json.loads(json.dumps(struct(mean_utilization_bp=bp).to_wire()))
        assert wire_usage_struct(12, body).mean_utilization_bp == bp


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("period_start", "2026-01-14T12:00:00.5Z", "fraction of a second"),
        ("period_start", "2026-01-14T12:00:00", "time zone"),
        ("gpu_seconds", "1.0001", "3 decimal places"),
        ("gpu_seconds", "NaN", "non-negative"),
        ("mean_utilization_pct", 93.571, "2 decimal places"),
        ("period_end", "2026-01-14T11:00:00Z", "after period_start"),
        ("mean_utilization_pct", "93.57", "finite number"),
        ("peak_memory_mb", 20480.5, "integer"),
        ("period_start", None, "ISO 8601"),
    ],
)
def test_a_report_the_struct_cannot_carry_exactly_is_unsignable(field: str, value: object, words: str) -> None:
    body = {**struct().to_wire(), field: value}

    with pytest.raises(UnsignableReport, match=words):
        wire_usage_struct(12, body)


def test_server_side_derivation_accepts_parsed_values() -> None:
    derived = UsageStruct.from_wire(
        lease_id=12,
        report_id="12-1768392000",
        period_start=T0,
        period_end=T0.replace(minute=1),
        gpu_seconds=Decimal("57.345"),
        mean_utilization_pct=93.57,
        peak_memory_mb=20480,
    )

    assert derived == struct()


# --- the key file ---------------------------------------------------------------------------------


def test_key_file_is_private_and_loads_back_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "state" / "signing.key"

    created = create_key_file(path)
    loaded = load_key_file(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert loaded.address == created.address
    report = struct()
    assert recover_usage_signer(report, sign_usage(report, loaded)) == created.address
    assert not list(path.parent.glob(".*tmp"))


def test_key_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        create_key_file(tmp_path / "signing.key")
    finally:
        os.umask(old)

    assert stat.S_IMODE((tmp_path / "signing.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "signing.key"
    create_key_file(path)
    path.chmod(mode)

    with pytest.raises(KeyFileError, match=f"mode {mode:04o}.*chmod 600"):
        load_key_file(path)


def test_existing_key_file_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    first = create_key_file(path)

    with pytest.raises(KeyFileError, match="already exists"):
        create_key_file(path)

    assert load_key_file(path).address == first.address


def test_missing_or_damaged_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    with pytest.raises(KeyFileError, match=r"does not exist.*register"):
        load_key_file(path)

    create_key_file(path)
    data = json.loads(path.read_text())
    data["address"] = "0x" + "1" * 40
    path.write_text(json.dumps(data))
    with pytest.raises(KeyFileError, match="damaged"):
        load_key_file(path)

    path.write_text("not json")
    with pytest.raises(KeyFileError, match="not a valid key file"):
        load_key_file(path)


def test_private_key_never_appears_in_repr(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "signing.key")
    secret = json.loads((tmp_path / "signing.key").read_text())["private_key"]

    assert secret[2:] not in repr(key)
    assert key.address in repr(key)
