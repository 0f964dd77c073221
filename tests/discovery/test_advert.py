"""Advert TXT encoding: short keys, exact round trip, nothing but hashes and numbers, garbage refused."""

from __future__ import annotations

import pytest

from cetd.discovery.advert import Advert, CapabilitySummary
from cetd.ids import PROTOCOL_VERSION, DeviceId, HouseholdId

HOUSEHOLD = HouseholdId("3f2a9c0d41be5e6a7788990011223344")
DEVICE = DeviceId("ABCDEFG-HIJKLMN-OPQRSTU-VWXYZ23")


def make_advert(**overrides: object) -> Advert:
    fields: dict[str, object] = {
        "device_id": DEVICE,
        "household_id": HOUSEHOLD,
        "port": 7443,
        "enroll_port": 7444,
        "state": "member",
        "capabilities": CapabilitySummary(
            cores=6, memory_bytes=8 * 2**30, accelerator="cuda:NVIDIA Jetson Orin", rank=12.345678901234567
        ),
    }
    fields.update(overrides)
    return Advert(**fields)  # type: ignore[arg-type]  # test helper: fields checked by Advert itself


@pytest.mark.timeout(10)
def test_txt_uses_the_short_keys_and_plain_values() -> None:
    txt = make_advert().to_txt()
    assert txt == {
        "v": str(PROTOCOL_VERSION),
        "hh": HOUSEHOLD,
        "id": DEVICE,
        "p": "7443",
        "ep": "7444",
        "st": "member",
        "c": "6",
        "m": "8.0",
        "a": "cuda:NVIDIA Jetson Orin",
        "r": "12.345678901234567",
    }
    assert sum(len(key) + len(value) + 1 for key, value in txt.items()) < 200


@pytest.mark.timeout(10)
def test_round_trip_is_exact_except_memory_rounded_to_a_tenth_of_a_gib() -> None:
    advert = make_advert(
        capabilities=CapabilitySummary(cores=4, memory_bytes=4_000_000_000, accelerator="", rank=0.1 + 0.2)
    )
    txt = advert.to_txt()
    assert txt["m"] == "3.7"
    assert txt["a"] == "-"
    parsed = Advert.from_txt({key.encode(): value.encode() for key, value in txt.items()})
    assert parsed.capabilities.memory_bytes == round(3.7 * 2**30)
    assert parsed.capabilities.rank == 0.1 + 0.2  # bit-exact: ranks decide elections
    assert parsed.capabilities.accelerator == ""
    expected_caps = CapabilitySummary(cores=4, memory_bytes=round(3.7 * 2**30), accelerator="", rank=0.1 + 0.2)
    assert parsed == make_advert(capabilities=expected_caps)
    assert Advert.from_txt(txt) == parsed  # str keys as well as bytes


@pytest.mark.timeout(10)
def test_pending_device_without_household() -> None:
    advert = make_advert(household_id=HouseholdId(""), state="pending", port=0, enroll_port=0)
    txt = advert.to_txt()
    assert txt["hh"] == ""
    assert txt["st"] == "pending"
    assert Advert.from_txt(txt) == make_advert(
        household_id=HouseholdId(""),
        state="pending",
        port=0,
        enroll_port=0,
        capabilities=CapabilitySummary(
            cores=6, memory_bytes=8 * 2**30, accelerator="cuda:NVIDIA Jetson Orin", rank=12.345678901234567
        ),
    )


@pytest.mark.timeout(10)
def test_unknown_keys_are_ignored_and_optional_ones_default() -> None:
    txt: dict[str, str | None] = dict(make_advert().to_txt())
    txt["future"] = "1"
    del txt["ep"]
    del txt["a"]
    parsed = Advert.from_txt(txt)
    assert parsed.enroll_port == 0
    assert parsed.capabilities.accelerator == ""


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "household_id",
    ["Smith family", "smiths-home", "abc", "0123456789abcdefX"],
)
def test_household_names_cannot_be_advertised(household_id: str) -> None:
    with pytest.raises(ValueError, match="hex digest"):
        make_advert(household_id=HouseholdId(household_id))


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device_id": DeviceId("")}, "device ID"),
        ({"device_id": DeviceId("has space")}, "device ID"),
        ({"household_id": HouseholdId("")}, "must name its household"),
        ({"state": "admin"}, "state"),
        ({"port": 70000}, "port 70000"),
        ({"enroll_port": -1}, "enroll port"),
        ({"protocol_version": -1}, "protocol version"),
    ],
)
def test_invalid_adverts_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_advert(**overrides)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("caps", "message"),
    [
        ({"cores": -1}, "cores"),
        ({"memory_bytes": -1}, "memory"),
        ({"accelerator": "-"}, "accelerator"),
        ({"accelerator": "x" * 101}, "accelerator"),
        ({"rank": float("nan")}, "rank"),
        ({"rank": float("inf")}, "rank"),
    ],
)
def test_invalid_capabilities_are_refused(caps: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"cores": 1, "memory_bytes": 1, "accelerator": "", "rank": 0.0}
    fields.update(caps)
    with pytest.raises(ValueError, match=message):
        CapabilitySummary(**fields)  # type: ignore[arg-type]  # fields checked by CapabilitySummary


def _with(key: str, value: bytes | None) -> dict[bytes, bytes | None]:
    txt: dict[bytes, bytes | None] = {k.encode(): v.encode() for k, v in make_advert().to_txt().items()}
    if value is None:
        del txt[key.encode()]
    else:
        txt[key.encode()] = value
    return txt


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("txt", "message"),
    [
        ({}, "lacks"),
        (_with("id", None), "lacks 'id'"),
        (_with("v", b"one"), "v="),
        (_with("p", b"-5"), "p="),
        (_with("p", b"99999"), "port"),
        (_with("c", b"\xd9\xa3"), "c="),  # an Arabic-Indic digit: isdigit() but not ASCII
        (_with("st", b"boss"), "st="),
        (_with("m", b"lots"), "m="),
        (_with("m", b"nan"), "m="),
        (_with("r", b"nan"), "rank"),
        (_with("hh", b"Smith family"), "hex digest"),
        (_with("id", b"\xff\xfe"), "UTF-8"),
        ({b"id": None}, "lacks"),
    ],
)
def test_malformed_txt_raises_value_error(txt: dict[bytes, bytes | None], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Advert.from_txt(txt)
