"""``raflora``: administer a raflora server from the command line (docs/operations.md).

::

    raflora [global options] federations create --spec FILE | --id ID --modules NAME:D_OUT:D_IN ...
    raflora [global options] federations list | get ID | rotate-secret ID | delete ID [--archive]
    raflora [global options] federations export ID --out DIR [--rank R] [--round N]
    raflora [global options] clients list ID | credential ID CLIENT_ID

Global options (also accepted after the subcommand): ``--target`` (default ``$RAFLORA_TARGET``
or ``127.0.0.1:50051``), ``--tls-ca FILE`` / ``--tls`` (TLS with that CA, or the system's),
``--tls-cert FILE --tls-key FILE`` (mutual TLS), ``--admin-token-file FILE`` (default
``$RAFLORA_ADMIN_TOKEN``), ``--format table|json``, ``--timeout SECONDS``.

Exit status: 0 on success, 1 when the server refuses (one line on stderr: the status code, the
stable reason and the server's message) or a local file is wrong, 2 for usage errors. JSON
output is the messages' fields by their proto names, with integers as numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from raflora.v1 import aggregation_pb2 as pb

from .client import AdminClient
from .errors import RafloraError

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "RAFLORA_TARGET"
ADMIN_TOKEN_ENV = "RAFLORA_ADMIN_TOKEN"
DEFAULT_TIMEOUT = 30.0
EXPORT_TIMEOUT = 600.0
PROG = "raflora"


class UsageError(Exception):
    """A command line that parses but does not make sense (exit status 2)."""


# -- the command line ---------------------------------------------------------------------------
def _global_options(parser: argparse.ArgumentParser) -> None:
    """Options every command takes, before or after the subcommand (no defaults here, so that a
    subcommand's copy never overrides a value given before it; see :func:`_settings`)."""
    s = argparse.SUPPRESS
    g = parser.add_argument_group("connection and output")
    g.add_argument("--target", default=s, help=f"host:port (${TARGET_ENV}, {DEFAULT_TARGET})")
    g.add_argument("--tls", action="store_true", default=s, help="TLS with the system's CAs")
    g.add_argument("--tls-ca", type=Path, default=s, metavar="FILE", help="TLS: trust this CA")
    g.add_argument("--tls-cert", type=Path, default=s, metavar="FILE", help="mutual TLS: cert")
    g.add_argument("--tls-key", type=Path, default=s, metavar="FILE", help="mutual TLS: key")
    g.add_argument(
        "--admin-token-file",
        type=Path,
        default=s,
        metavar="FILE",
        help=f"file holding the admin token (default: ${ADMIN_TOKEN_ENV})",
    )
    g.add_argument("--format", choices=("table", "json"), default=s, help="output (table)")
    g.add_argument("--timeout", type=float, default=s, metavar="SECONDS", help="per call")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Administer a raflora aggregation server.",
        epilog="Exit status: 0 ok, 1 refused by the server or a bad local file, 2 usage.",
    )
    _global_options(parser)
    groups = parser.add_subparsers(dest="group", required=True, metavar="{federations,clients}")

    def command(
        parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        _global_options(sub)
        return sub

    feds = groups.add_parser("federations", help="create, inspect, delete and export federations")
    fed = feds.add_subparsers(dest="command", required=True)

    create = command(fed, "create", "create a federation from a spec file or from flags")
    create.add_argument(
        "--spec",
        "-f",
        type=Path,
        metavar="FILE",
        help="JSON or TOML spec (a federations_file entry, or a list of them)",
    )
    create.add_argument("--id", dest="federation_id", help="federation id")
    create.add_argument(
        "--modules", nargs="+", metavar="NAME:D_OUT:D_IN", help="adapted modules and shapes"
    )
    create.add_argument("--max-rank", type=int, help="R, the largest client rank")
    create.add_argument("--allowed-ranks", type=int, nargs="+", metavar="R")
    create.add_argument("--strategy", help="raflora_ha (default), raflora, flexlora, ...")
    create.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="strategy option"
    )
    create.add_argument("--lora-alpha", type=float)
    create.add_argument("--scaling-rule", choices=("standard", "rslora"))
    create.add_argument("--weighting", choices=("examples", "uniform"))
    create.add_argument("--factor-split", choices=("flexlora", "balanced"))
    create.add_argument("--min-clients", type=int)
    create.add_argument("--expected-clients", type=int)
    create.add_argument("--deadline-seconds", type=float)
    create.add_argument("--keep-rounds", type=int, help="keep the newest N rounds (0: all)")
    create.add_argument("--init-seed", type=int)
    create.add_argument(
        "--open-enrolment",
        action="store_true",
        help="auth on: a shared secret enrols each client id once (shown once)",
    )
    create.add_argument(
        "--enrolment-secret-file", type=Path, metavar="FILE", help="that secret (implies open)"
    )

    command(fed, "list", "list the server's federations")
    get = command(fed, "get", "one federation's spec and status")
    get.add_argument("federation_id", metavar="ID")
    rotate = command(fed, "rotate-secret", "replace the enrolment secret (revokes client tokens)")
    rotate.add_argument("federation_id", metavar="ID")
    rotate.add_argument("--secret-file", type=Path, metavar="FILE", help="the new secret")
    delete = command(fed, "delete", "stop a federation and delete (or archive) its state")
    delete.add_argument("federation_id", metavar="ID")
    delete.add_argument(
        "--archive", action="store_true", help="move it to <data_dir>/archive/ instead"
    )
    export = command(fed, "export", "write a published round as a PEFT adapter directory")
    export.add_argument("federation_id", metavar="ID")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="new directory")
    export.add_argument("--rank", type=int, help="rank r <= R (default: R)")
    export.add_argument("--round", type=int, help="published round (default: the newest)")
    export.add_argument("--base-model", metavar="NAME", help="base_model_name_or_path")

    clients_parser = groups.add_parser("clients", help="a federation's clients")
    clients = clients_parser.add_subparsers(dest="command", required=True)
    listing = command(clients, "list", "a federation's joined clients and their terms")
    listing.add_argument("federation_id", metavar="ID")
    credential = command(clients, "credential", "issue a client's own credential (auth on)")
    credential.add_argument("federation_id", metavar="ID")
    credential.add_argument("client_id", metavar="CLIENT_ID")
    return parser


# -- settings -----------------------------------------------------------------------------------
def _read_secret(path: Path, what: str) -> str:
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"{what} file {path} is empty")
    return value


def _settings(args: argparse.Namespace) -> tuple[str, grpc.ChannelCredentials | None, str | None]:
    target = getattr(args, "target", None) or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key go together (mutual TLS)")
    credentials = None
    if ca is not None or cert is not None or getattr(args, "tls", False):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes() if ca is not None else None,
            private_key=key.read_bytes() if key is not None else None,
            certificate_chain=cert.read_bytes() if cert is not None else None,
        )
    token_file = getattr(args, "admin_token_file", None)
    if token_file is not None:
        token: str | None = _read_secret(token_file, "admin token")
    else:
        token = os.environ.get(ADMIN_TOKEN_ENV) or None
    return target, credentials, token


# -- output -------------------------------------------------------------------------------------
def plain(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data: proto field names, every field, integers as numbers."""
    data: dict[str, Any] = json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )
    return data


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None or value == "" else str(value)


def _phase(status: pb.RoundStatus) -> str:
    return pb.RoundPhase.Name(status.phase).removeprefix("ROUND_PHASE_").lower()


def _federation_rows(federations: Iterable[pb.Federation]) -> str:
    rows = [
        (
            f.spec.federation_id,
            f.spec.strategy,
            f.spec.max_rank,
            f.status.round,
            _phase(f.status),
            f.status.joined_clients,
            f.status.uploads,
            f.spec.round_policy.keep_rounds or "all",
            f"degraded: {f.status.degraded}" if f.status.degraded else "ok",
        )
        for f in federations
    ]
    header = ("ID", "STRATEGY", "R", "ROUND", "PHASE", "CLIENTS", "UPLOADS", "KEEP", "STATE")
    return _table(rows, header)


def _federation_detail(f: pb.Federation) -> str:
    s, st, p = f.spec, f.status, f.spec.round_policy
    scaling = pb.ScalingRule.Name(s.scaling_rule).removeprefix("SCALING_RULE_").lower()
    rows: list[tuple[str, object]] = [
        ("federation_id", s.federation_id),
        ("strategy", s.strategy),
        ("strategy_options", ", ".join(f"{k}={v}" for k, v in sorted(s.strategy_options.items()))),
        ("max_rank", s.max_rank),
        ("allowed_ranks", " ".join(map(str, s.allowed_ranks)) or "any"),
        ("lora_alpha", s.lora_alpha),
        ("scaling_rule", scaling),
        ("modules", len(s.modules)),
        ("round", st.round),
        ("phase", _phase(st)),
        ("uploads", st.uploads),
        ("joined_clients", st.joined_clients),
        ("min/expected", f"{p.min_clients}/{p.expected_clients or p.min_clients}"),
        ("deadline_seconds", p.deadline_seconds or "none"),
        ("keep_rounds", p.keep_rounds or "all"),
        ("e_min", st.energy.e_min if st.round else None),
        ("degraded", st.degraded or "no"),
    ]
    if st.HasField("privacy"):  # docs/design.md §2.9
        dp = st.privacy
        rows += [
            ("privacy", f"z={dp.noise_multiplier:g}, clip_norm={dp.clip_norm:g}"),
            ("epsilon", f"{dp.epsilon:.4g} at delta={dp.delta:g} after {dp.rounds} round(s)"),
        ]
    rows += [("module", f"{m.name} ({m.d_out}x{m.d_in})") for m in s.modules]
    if f.enrolment_secret:
        rows.append(("enrolment_secret", f"{f.enrolment_secret}  (shown once: store it now)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in rows)


# -- commands -----------------------------------------------------------------------------------
Output = tuple[Any, str]  # (JSON-ready data, table text)


def _load_specs(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the tomli backport, if installed
            try:
                tomllib = importlib.import_module("tomli")
            except ModuleNotFoundError:
                raise ValueError(f"{path}: TOML needs Python 3.11+ or tomli; use JSON") from None
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not TOML: {exc}") from None
        if isinstance(data.get("federations"), list):
            data = data["federations"]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
    entries = data if isinstance(data, list) else [data]
    if not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{path}: expected a spec object or a list of them")
    return [dict(e) for e in entries]


def _spec_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    if not args.federation_id or not args.modules:
        raise UsageError("federations create needs --spec FILE, or --id and --modules")
    modules = []
    for item in args.modules:
        parts = item.rsplit(":", 2)
        try:
            name, d_out, d_in = parts[0], int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise UsageError(f"--modules {item!r}: expected NAME:D_OUT:D_IN") from None
        modules.append({"name": name, "d_out": d_out, "d_in": d_in})
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        options[key] = value
    spec: dict[str, Any] = {"federation_id": args.federation_id, "modules": modules}
    if options:
        spec["strategy_options"] = options
    for name in (
        "max_rank",
        "allowed_ranks",
        "strategy",
        "lora_alpha",
        "scaling_rule",
        "weighting",
        "factor_split",
        "min_clients",
        "expected_clients",
        "deadline_seconds",
        "keep_rounds",
        "init_seed",
    ):
        value = getattr(args, name)
        if value is not None:
            spec[name] = value
    return spec


def _create(admin: AdminClient, args: argparse.Namespace, timeout: float) -> Output:
    flags = [n for n in ("federation_id", "modules") if getattr(args, n)]
    if args.spec is not None and flags:
        raise UsageError("give --spec FILE or the spec's flags (--id, --modules, ...), not both")
    entries = _load_specs(args.spec) if args.spec is not None else [_spec_from_flags(args)]
    base = args.spec.parent if args.spec is not None else Path.cwd()
    # Validate every entry before creating any.
    requests = []
    for entry in entries:
        secret = entry.pop("enrolment_secret", None)
        secret_file = entry.pop("enrolment_secret_file", None)
        open_enrolment = bool(entry.pop("open_enrolment", False)) or args.open_enrolment
        if args.enrolment_secret_file is not None:
            secret = _read_secret(args.enrolment_secret_file, "enrolment secret")
        elif secret_file is not None:
            secret = _read_secret(base / str(secret_file), "enrolment secret")
        spec = AdminClient.spec_from_mapping(entry)
        requests.append((spec, str(secret or ""), open_enrolment or secret is not None))
    created: list[pb.Federation] = []
    try:
        for spec, secret, open_ in requests:
            created.append(admin.create_federation(spec, timeout, secret, open_enrolment=open_))
    except RafloraError:
        # Those already created may carry an enrolment secret shown only once: print them.
        for federation in created:
            print(_federation_detail(federation), flush=True)
        raise
    data = [plain(f) for f in created]
    return (data[0] if len(data) == 1 else data), "\n\n".join(map(_federation_detail, created))


def _run(args: argparse.Namespace, admin: AdminClient) -> Output:
    timeout = getattr(args, "timeout", None)
    t = DEFAULT_TIMEOUT if timeout is None else timeout
    fid: str = getattr(args, "federation_id", None) or ""
    key = (args.group, args.command)
    if key == ("federations", "create"):
        return _create(admin, args, t)
    if key == ("federations", "list"):
        federations = sorted(admin.list_federations(t), key=lambda f: f.spec.federation_id)
        return [plain(f) for f in federations], _federation_rows(federations)
    if key == ("federations", "get"):
        federation = admin.get_federation(fid, t)
        return plain(federation), _federation_detail(federation)
    if key == ("federations", "rotate-secret"):
        chosen = _read_secret(args.secret_file, "secret") if args.secret_file else ""
        secret = admin.rotate_enrolment_secret(fid, chosen, t)
        data: dict[str, Any] = {"federation_id": fid, "enrolment_secret": secret}
        return data, f"new enrolment secret of {fid} (client tokens revoked): {secret}"
    if key == ("federations", "delete"):
        # A delete waits out an aggregation in flight: allow it the time of a long round.
        archived = admin.delete_federation(fid, archive=args.archive, timeout=max(t, 600.0))
        data = {"federation_id": fid, "archive": archived}
        text = f"deleted federation {fid}"
        return data, text + (f"; archived as <data_dir>/archive/{archived}" if archived else "")
    if key == ("federations", "export"):
        out = admin.export_adapter(
            fid,
            args.out,
            rank=args.rank,
            round=args.round,
            base_model=args.base_model,
            timeout=EXPORT_TIMEOUT if timeout is None else timeout,
        )
        config = json.loads((out / "adapter_config.json").read_text())
        data = {"federation_id": fid, "path": str(out), "r": config["r"]}
        data["lora_alpha"] = config["lora_alpha"]
        return data, f"exported {fid} at rank {config['r']} to {out}"
    if key == ("clients", "list"):
        clients = admin.list_clients(fid, t)
        rows = [
            (
                c.client_id,
                c.rank,
                c.num_examples,
                c.lora_alpha,
                c.scale,
                c.observer,
                c.last_round_uploaded if c.HasField("last_round_uploaded") else None,
            )
            for c in clients
        ]
        header = ("CLIENT_ID", "RANK", "EXAMPLES", "ALPHA", "SCALE", "OBSERVER", "LAST_UPLOAD")
        return [plain(c) for c in clients], _table(rows, header)
    if key == ("clients", "credential"):
        issued = admin.issue_client_credential(fid, args.client_id, t)
        data = {"federation_id": fid, "client_id": args.client_id, "client_credential": issued}
        return data, f"credential of {args.client_id} (shown once): {issued}"
    raise UsageError(f"unknown command {' '.join(key)}")  # pragma: no cover - argparse refuses


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe(error: RafloraError) -> str:
    """One line for a refused call: code, reason, the server's message."""
    head = error.code.name if isinstance(error.code, grpc.StatusCode) else "ERROR"
    if error.reason:
        head += f" {error.reason}"
    return f"{head}: {_one_line(error.details)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: exit status 2 (argparse)
    try:
        target, credentials, token = _settings(args)
        with AdminClient(target, credentials=credentials, admin_token=token) as admin:
            data, text = _run(args, admin)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except RafloraError as exc:
        return _fail(describe(exc))
    except (ValueError, OSError) as exc:  # a spec, secret or token file; the export directory
        return _fail(_one_line(str(exc)))
    except KeyboardInterrupt:
        return 130
    if getattr(args, "format", "table") == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text)
    return 0


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
