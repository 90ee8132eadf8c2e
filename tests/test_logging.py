"""The server's log: JSON lines with --log-format json, and an access line per refused RPC.

A real ``raflora-server`` process runs with ``--log-format json --log-level DEBUG``; every line
it writes (stderr; stdout shares the file and stays empty) must parse as one JSON object with
level, logger and message. A federation runs a round, then a stale push and a GetRound on an
unknown federation are refused: each leaves one access line (logger raflora.server.access)
with the method, peer, gRPC status, reason, federation and client; the join is logged at
INFO, the accepted pushes and served pulls at DEBUG. In the default text format the same
access line is one readable line with the same fields on the record.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from raflora.client_sdk import RafloraClient
from raflora.client_sdk.errors import FailedPreconditionError, NotFoundError
from raflora.server.app import JsonFormatter
from raflora.server.testing import ServerProcess, threaded_server

from .helpers.adapters import factors
from .helpers.federations import join_federations

MODULES = {"layers.0.q": (12, 8)}
CLIENTS = [("c2", 2, 10, 4.0), ("c4", 4, 20, 8.0)]
ACCESS = "raflora.server.access"


def run_a_round_and_two_refusals(target: str, fid: str) -> None:
    with ExitStack() as stack:
        clients = join_federations(stack, target, {fid: "raflora"}, MODULES, CLIENTS)[fid]
        for i, (client, (_, rank, n, _)) in enumerate(zip(clients, CLIENTS, strict=True)):
            client.push(factors(rank, i, MODULES), round=0, num_examples=n)
        assert clients[0].wait_for_round(0, timeout=60).round == 1
        assert clients[1].pull().round == 1
        with pytest.raises(FailedPreconditionError):  # round 0 is closed
            clients[0].push(factors(2, 9, MODULES), round=0, num_examples=10)
        with (
            RafloraClient(target, "no-such-federation", "c2") as stranger,
            pytest.raises(NotFoundError),
        ):
            stranger.status()


def access_lines(records: list[dict[str, Any]], status: str) -> list[dict[str, Any]]:
    return [r for r in records if r["logger"] == ACCESS and r.get("status") == status]


def test_json_log_lines_and_access_log_of_refusals(tmp_path: Path) -> None:
    fid = "logged"
    server = ServerProcess(
        tmp_path / "data",
        tmp_path / "server.log",
        extra_args=["--log-format", "json", "--log-level", "DEBUG"],
    )
    with server:
        run_a_round_and_two_refusals(server.target, fid)
    assert server.process.returncode == 0
    lines = server.log_text().splitlines()
    assert len(lines) > 10
    records: list[dict[str, Any]] = []
    for line in lines:
        record = json.loads(line)  # every line, not only ours
        assert isinstance(record, dict), line
        assert {"ts", "level", "logger", "message"} <= set(record), line
        assert record["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}, line
        records.append(record)
    messages = [r["message"] for r in records]
    assert any(m.startswith("raflora server on") for m in messages)
    assert "raflora server stopped" in messages

    stale = [r for r in access_lines(records, "FAILED_PRECONDITION") if r["method"] == "Push"]
    assert len(stale) == 1, stale
    (refused,) = stale
    assert refused["level"] == "INFO" and refused["reason"] == "ROUND_CLOSED"
    assert (refused["federation"], refused["client"]) == (fid, "c2")
    assert refused["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert refused["duration_seconds"] >= 0
    assert "round 0 is closed" in refused["message"]

    (unknown,) = access_lines(records, "NOT_FOUND")
    assert unknown["method"] == "GetRound" and unknown["reason"] == "FEDERATION_NOT_FOUND"
    assert unknown["federation"] == "no-such-federation" and unknown["level"] == "INFO"

    served = access_lines(records, "OK")
    joins = [r for r in served if r["method"] == "Join"]
    assert {(r["federation"], r["client"], r["level"]) for r in joins} == {
        (fid, "c2", "INFO"),
        (fid, "c4", "INFO"),
    }
    pushes = [r for r in served if r["method"] == "Push"]
    assert len(pushes) == 2 and {r["level"] for r in pushes} == {"DEBUG"}
    assert all("round 0, " in r["message"] and " bytes" in r["message"] for r in pushes)
    assert any(r["method"] == "Pull" and r["client"] == "c4" for r in served)


def test_text_access_line_carries_the_same_fields(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        threaded_server(tmp_path) as server,
        caplog.at_level(logging.INFO, logger=ACCESS),
    ):
        run_a_round_and_two_refusals(server.target, "texted")
    (record,) = [
        r for r in caplog.records if r.name == ACCESS and getattr(r, "status", "") == "NOT_FOUND"
    ]
    assert record.getMessage().startswith(
        "GetRound refused: NOT_FOUND FEDERATION_NOT_FOUND federation='no-such-federation' "
        "client='c2' peer="
    )
    stale = [r for r in caplog.records if getattr(r, "reason", "") == "ROUND_CLOSED"]
    assert len(stale) == 1 and stale[0].levelno == logging.INFO
    # The JSON formatter turns the same record into one line with the same fields.
    line = json.loads(JsonFormatter().format(stale[0]))
    assert {k: line[k] for k in ("method", "status", "reason", "federation", "client")} == {
        "method": "Push",
        "status": "FAILED_PRECONDITION",
        "reason": "ROUND_CLOSED",
        "federation": "texted",
        "client": "c2",
    }


def test_a_client_supplied_newline_cannot_forge_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        threaded_server(tmp_path) as server,
        caplog.at_level(logging.INFO, logger=ACCESS),
        RafloraClient(server.target, "fed\nFORGED admin logged in", "c\r\nFORGED") as evil,
        pytest.raises(NotFoundError),
    ):
        evil.status()
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS]
    lines += [str(getattr(r, "federation", "")) for r in caplog.records if r.name == ACCESS]
    assert lines and all("\n" not in line and "\r" not in line for line in lines)


def test_a_tensor_name_with_a_newline_cannot_forge_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from raflora.client_sdk.errors import InvalidArgumentError

    with (
        threaded_server(tmp_path) as server,
        caplog.at_level(logging.INFO, logger=ACCESS),
        ExitStack() as stack,
    ):
        client = join_federations(stack, server.target, {"f": "raflora"}, MODULES, CLIENTS)["f"][0]
        tensors = factors(2, 1, MODULES)
        forged = "m\nFAKE INFO raflora.server.access: Join OK.lora_A.weight"
        tensors[forged] = tensors.pop("layers.0.q.lora_A.weight")
        with pytest.raises(InvalidArgumentError):
            client.push(tensors, round=0, num_examples=10)
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS]
    assert any("FAKE" in line for line in lines)  # the refusal was logged ...
    assert all("\n" not in line for line in lines)  # ... on one line
