"""``batchgen``: the operator's command line.

    batchgen up                      everything on this machine (what `make run` runs)
    batchgen api                     the HTTP API (gunicorn)
    batchgen worker --model demo     one worker (same flags as `python -m worker`)
    batchgen migrate                 bring the database schema to the current revision
    batchgen build-model --preset demo
                                     build a small random-weight Llama model and register it
    batchgen convert meta-llama/Llama-2-7b-chat-hf --name meta-llama/Llama-2-7b-chat-hf
                                     convert a Hugging Face checkpoint to CTranslate2 int8
    batchgen models                  list registered models and whether they are installed
    batchgen keys create --owner alice
                                     create an API key (also: keys list, keys revoke KEY_ID)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from core.settings import Settings, SettingsError


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"batchgen: {exc}") from None


def cmd_up(args: argparse.Namespace) -> int:
    from cli.up import run_local

    return run_local(_settings(), workers=args.workers)


def cmd_api(args: argparse.Namespace) -> int:
    settings = _settings()
    bind = args.bind or f"{settings.host}:{settings.port}"
    argv = [sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", str(args.workers),
            "--threads", str(args.threads), "--graceful-timeout", "30", "--access-logfile", "-",
            "webapi.wsgi:app"]
    os.execv(sys.executable, argv)
    return 0  # not reached


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import main as worker_main

    return worker_main(args.rest)


def cmd_migrate(args: argparse.Namespace) -> int:
    from core.db import upgrade

    settings = _settings()
    upgrade(settings.database_url)
    print(f"database at head: {settings.database_url.split('@')[-1]}")
    return 0


def cmd_build_model(args: argparse.Namespace) -> int:
    from core.logs import configure_logging
    from core.registry import ModelSpec, register_model
    from worker.builder import build_model

    settings = _settings()
    configure_logging(settings.log_level, process="build")
    name = args.name or args.preset
    out = args.output or settings.models_dir / name
    if args.keep_if_present and (out / "model.bin").is_file():
        print(f"{name} is already built in {out}")
        return 0
    build_model(out, preset=args.preset, seed=args.seed, quantization=args.quantization,
                keep_checkpoint=args.keep_checkpoint, force=args.force)
    if name != "demo":  # demo is built in; others are added to the registry file
        register_model(settings, ModelSpec(name=name, path=str(out.resolve()), chat=True,
                                           description=f"random-weight {args.preset} model"))
    print(f"built {name} in {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from core.logs import configure_logging
    from core.registry import ModelSpec, load_registry, register_model
    from worker.convert import convert_checkpoint

    settings = _settings()
    configure_logging(settings.log_level, process="convert")
    name = args.name or Path(args.source).name
    registry = load_registry(settings)
    try:
        known = registry.resolve(name)
    except Exception:
        known = None
    out = args.output or (registry.directory(known) if known else settings.models_dir / name.replace("/", "--"))
    convert_checkpoint(args.source, out, quantization=args.quantization, force=args.force)
    chat = args.chat if args.chat is not None else (known.chat if known else "chat" in name.lower())
    spec = ModelSpec(name=name, path=str(Path(out).resolve()), chat=chat,
                     context_length=args.context_length or (known.context_length if known else 4096),
                     defaults=known.defaults if known else {}, aliases=known.aliases if known else (),
                     source=str(args.source))
    path = register_model(settings, spec)
    print(f"converted {args.source} -> {out} ({args.quantization}); registered {name!r} in {path}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from core import auth
    from core.db import Database
    from core.errors import NotFoundError

    settings = _settings()
    db = Database(settings.database_url)
    try:
        if args.action == "create":
            with db.write() as session:
                key, token = auth.create_key(session=session, owner=args.owner, name=args.name or "",
                                             admin=args.admin)
            print(f"created {key.id} for owner {key.owner!r}{' (admin)' if key.admin else ''}; the key, shown "
                  f"only now:\n{token}")
        elif args.action == "list":
            with db.read() as session:
                for key in auth.list_keys(session=session):
                    state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
                    print(f"{key.id}  {key.owner:20} {'admin' if key.admin else '     '}  {state:24} {key.name}")
        else:
            try:
                with db.write() as session:
                    key = auth.revoke_key(session=session, key_id=args.key_id)
            except NotFoundError as exc:
                raise SystemExit(f"batchgen: {exc.message}") from None
            print(f"revoked {key.id} (owner {key.owner!r}); API processes stop accepting it within 10 s")
    finally:
        db.dispose()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from core.registry import load_registry

    registry = load_registry(_settings())
    for spec in registry:
        state = "installed" if registry.is_installed(spec) else "not installed"
        kind = "chat" if spec.chat else "base"
        aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        print(f"{spec.name:36} {kind:4} ctx={spec.context_length:<5} {state:13} {registry.directory(spec)}{aliases}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run Redis (if needed), the API and workers on this machine")
    p.add_argument("--workers", type=int, default=1, help="worker processes for the model (default 1)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("api", help="serve the HTTP API with gunicorn")
    p.add_argument("--bind", help="host:port (default BATCHGEN_HOST:BATCHGEN_PORT)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="run one worker (flags of `python -m worker --help`)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", help="migrate the database to the current schema")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("build-model", help="build a small random-weight Llama model")
    p.add_argument("--preset", default="demo", help="tiny, demo, bench or llama-2-7b-shape")
    p.add_argument("--name", help="registry name (default: the preset)")
    p.add_argument("--output", type=Path, help="model directory (default: models dir / name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", default="int8")
    p.add_argument("--keep-checkpoint", type=Path, help="also keep the transformers checkpoint here")
    p.add_argument("--force", action="store_true", help="replace an existing model directory")
    p.add_argument("--keep-if-present", action="store_true", help="do nothing if the model is already built")
    p.set_defaults(func=cmd_build_model)

    p = sub.add_parser("convert", help="convert a Hugging Face Llama checkpoint to CTranslate2")
    p.add_argument("source", help="checkpoint directory, or a hub id where the hub is reachable")
    p.add_argument("--name", help="registry name (default: the directory name)")
    p.add_argument("--output", type=Path, help="model directory (default: from the registry)")
    p.add_argument("--quantization", default="int8")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="whether it is a chat model (default: from the registry or the name)")
    p.add_argument("--context-length", type=int)
    p.add_argument("--force", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("keys", help="create, list or revoke API keys",
                       description="Keys are stored only as salted hashes: a new key is shown once.")
    keys = p.add_subparsers(dest="action", required=True)
    k = keys.add_parser("create", help="create a key for an owner (prints it once)")
    k.add_argument("--owner", required=True, help="whose jobs the key reaches")
    k.add_argument("--name", help="a label, e.g. who or what uses it")
    k.add_argument("--admin", action="store_true", help="may see every owner's jobs")
    keys.add_parser("list", help="list keys (never the secrets)")
    k = keys.add_parser("revoke", help="revoke a key by its id (key_...)")
    k.add_argument("key_id")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``batchgen`` command."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

