"""`echo-relay tavus ...`: manage Tavus personas and conversations from the command line.

    echo-relay tavus personas create [--name NAME] [--replica ID]
    echo-relay tavus personas list | get ID | delete ID
    echo-relay tavus conversations create [--persona ID] [--replica ID] [--name NAME] [--test-mode]
                                          [--require-auth] [--callback-url URL] [--max-call-duration S]
    echo-relay tavus conversations list [--status active|ended] | get ID [--verbose] | end ID | delete ID

Every command takes `--json` to print the API's JSON instead of readable lines. `get` prints the
object itself (a `{"data": [obj]}` answer is unwrapped). Commands that get no body back from Tavus
(delete, end) print a small JSON status object with `--json`:
`{"persona_id"|"conversation_id": ID, "deleted": true}` or
`{"conversation_id": ID, "status": "ended", "already_ended": bool}`.

`add_tavus_parser(subparsers)` adds these commands to the main parser; `run_tavus(args, settings)`
runs them. Exit status: 0 success, 1 API or connection error, 2 configuration error (no API key).
Errors are one line on stderr, never a traceback, and never contain the API key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from pipeline.asr.models import english_only_by_name
from pipeline.tavus.client import (
    TavusAuthError,
    TavusClient,
    TavusConnectionError,
    TavusError,
)
from pipeline.tavus.provision import conversation_language

_EPILOG = ("The API key comes from TAVUS_API_KEY (or tavus.api_key: ${TAVUS_API_KEY} in the config),\n"
           "the base URL from TAVUS_API_URL or tavus.api_url (default https://tavusapi.com).\n"
           "Every command takes --json to print Tavus's JSON answer.")


def add_tavus_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `tavus` (with `personas` and `conversations`) to an argparse subparsers object.

    Returns the `tavus` parser. Dispatch parsed args with `run_tavus(args, settings)`; the parsed
    namespace carries `tavus_resource` and `tavus_action`.
    """
    fmt = argparse.RawDescriptionHelpFormatter
    tavus: argparse.ArgumentParser = subparsers.add_parser(
        "tavus", help="manage Tavus personas and conversations (REST API)", formatter_class=fmt,
        description="Manage the Tavus personas and conversations echo-relay uses, through the Tavus REST "
                    "API v2.", epilog=_EPILOG)
    resources = tavus.add_subparsers(dest="tavus_resource", metavar="{personas,conversations}", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print the JSON answered by Tavus instead of readable lines")
    paged = argparse.ArgumentParser(add_help=False)  # the two list commands page alike
    paged.add_argument("--limit", type=_positive_int, metavar="N", help="items per page (Tavus default: 10)")
    paged.add_argument("--page", type=_positive_int, metavar="N", help="page number, from 1")

    # --------------------------------------------------------------------------------- personas
    personas = resources.add_parser(
        "personas", help="create, list, show and delete personas", formatter_class=fmt,
        description="Personas define how a replica behaves. echo-relay needs an echo-mode persona "
                    "(pipeline_mode=echo): the replica speaks exactly what echo-relay sends.",
        epilog=_EPILOG)
    p_actions = personas.add_subparsers(dest="tavus_action", metavar="{create,list,get,delete}",
                                        required=True)
    p = p_actions.add_parser(
        "create", parents=[common], help="create an echo-mode persona",
        description="Create a persona with pipeline_mode=echo and print its persona_id. Put the id in "
                    "tavus.persona_id so echo-relay reuses it.")
    p.add_argument("--name", metavar="NAME",
                   help="persona name; the replica joins the room under this name "
                        "(default: tavus.persona_name, 'echo-relay')")
    p.add_argument("--replica", metavar="ID",
                   help="default replica (face) for its conversations (default: tavus.replica_id, if set)")
    p_actions.add_parser("list", parents=[common, paged], help="list personas",
                         description="List your personas, newest first.")
    p = p_actions.add_parser("get", parents=[common], help="show one persona",
                             description="Show a persona's settings.")
    p.add_argument("id", metavar="ID", help="persona_id")
    p = p_actions.add_parser("delete", parents=[common], help="delete a persona",
                             description="Delete a persona. Its existing conversations are not affected.")
    p.add_argument("id", metavar="ID", help="persona_id")

    # ---------------------------------------------------------------------------- conversations
    convs = resources.add_parser(
        "conversations", help="create, list, show, end and delete conversations", formatter_class=fmt,
        description="A conversation is a Daily room the replica joins. It is billed while active: end "
                    "the ones you create.", epilog=_EPILOG)
    c_actions = convs.add_subparsers(dest="tavus_action", metavar="{create,list,get,end,delete}",
                                     required=True)
    c = c_actions.add_parser(
        "create", parents=[common], help="start a conversation (a Daily room the replica joins)",
        description="Create a conversation and print its id and room URL. The replica joins the room "
                    "on its own. Timeouts not given here come from the config (tavus.*).")
    c.add_argument("--persona", metavar="ID", help="persona_id (default: tavus.persona_id)")
    c.add_argument("--replica", metavar="ID",
                   help="replica (face); needed unless the persona has a default replica "
                        "(default: tavus.replica_id)")
    c.add_argument("--name", metavar="NAME", help="conversation name (default: tavus.conversation_name)")
    c.add_argument("--test-mode", action="store_true",
                   help="Tavus test mode: the replica does not join, the conversation is born ended, "
                        "nothing is billed")
    c.add_argument("--require-auth", action="store_true",
                   help="private room: the answer carries a meeting_token needed to join")
    c.add_argument("--callback-url", metavar="URL", help="URL Tavus posts conversation events (webhooks) to")
    c.add_argument("--language", metavar="NAME",
                   help="properties.language: a full name (spanish) or multilingual (default: what `run` "
                        "would send: tavus.language, else from asr.language / asr.task)")
    c.add_argument("--max-call-duration", type=_positive_int, metavar="S",
                   help="end the conversation after S seconds (Tavus default: 3600; "
                        "default here: tavus.max_call_duration)")
    c = c_actions.add_parser("list", parents=[common, paged], help="list conversations",
                             description="List conversations, newest first.")
    c.add_argument("--status", choices=["active", "ended"], help="only conversations in this state")
    c = c_actions.add_parser("get", parents=[common], help="show one conversation",
                             description="Show a conversation: status, room URL, persona, replica.")
    c.add_argument("id", metavar="ID", help="conversation_id")
    c.add_argument("--verbose", action="store_true",
                   help="include event data (shutdown reason, transcript, joins) when Tavus has it")
    c = c_actions.add_parser("end", parents=[common], help="end a conversation (stops billing)",
                             description="End a conversation: the replica leaves and billing stops. "
                                         "Ending an already-ended conversation is not an error.")
    c.add_argument("id", metavar="ID", help="conversation_id")
    c = c_actions.add_parser("delete", parents=[common], help="delete a conversation",
                             description="Delete a conversation from your account.")
    c.add_argument("id", metavar="ID", help="conversation_id")
    return tavus


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ------------------------------------------------------------------------------------------ run
def run_tavus(args: argparse.Namespace, settings: Any, *, out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    """Run a parsed `tavus ...` command with `pipeline.config.Settings`. Returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    tavus = settings.tavus
    key = tavus.api_key.get_secret_value().strip() if tavus.api_key is not None else ""
    if not key:
        print("TAVUS_API_KEY is not set: export TAVUS_API_KEY=<your key> (or set tavus.api_key: "
              "${TAVUS_API_KEY} in the config)", file=err)
        return 2
    try:
        client = TavusClient(tavus.api_url, key, timeout_s=tavus.timeout_s, retries=tavus.retries)
    except ValueError as exc:
        print(f"Bad Tavus settings: {exc}", file=err)
        return 2
    try:
        if (args.tavus_resource, args.tavus_action) == ("conversations", "create") and args.language is None:
            args.language = conversation_language(tavus, settings.asr, settings.transform.output_language,
                                                  "en" if english_only_by_name(settings.asr.model) else None)
        return asyncio.run(_dispatch(client, args, tavus, out, err))
    except TavusAuthError as exc:
        if exc.status == 401:
            print(f"Tavus rejected the API key (401): {exc.message}", file=err)
        else:
            print(f"Tavus refused the request ({exc.status}): {exc.message}", file=err)
        return 1
    except TavusConnectionError as exc:
        print(f"Cannot reach Tavus: {exc.message}", file=err)
        return 1
    except TavusError as exc:
        where = f" {exc.status}" if exc.status is not None else ""
        print(f"Tavus API error{where}: {exc.message}", file=err)
        return 1
    except ValueError as exc:  # e.g. an empty id
        print(f"Invalid argument: {exc}", file=err)
        return 2
    except KeyboardInterrupt:
        print("Interrupted", file=err)
        return 130


async def _dispatch(client: TavusClient, args: argparse.Namespace, tavus: Any, out: TextIO,
                    err: TextIO) -> int:
    resource, action = args.tavus_resource, args.tavus_action
    as_json = bool(getattr(args, "json", False))
    async with client:
        if resource == "personas":
            if action == "create":
                body = await client.create_persona(
                    args.name or tavus.persona_name, pipeline_mode="echo",
                    default_replica_id=args.replica or tavus.replica_id)
                if as_json:
                    return _print_json(body, out)
                print(f"Created persona {body.get('persona_id')} "
                      f"(name {body.get('persona_name', args.name or tavus.persona_name)!r}, "
                      f"pipeline_mode echo)", file=out)
                return 0
            if action == "list":
                page = await client.list_personas(limit=args.limit, page=args.page)
                if as_json:
                    return _print_json(page, out)
                _print_table(page, ["persona_id", "persona_name", "pipeline_mode", "default_replica_id",
                                    "created_at"], "persona", out)
                return 0
            if action == "get":
                body = await client.get_persona(args.id)
                return _print_json(body, out) if as_json else _print_object(body, out)
            if action == "delete":
                await client.delete_persona(args.id)
                if as_json:
                    return _print_json({"persona_id": args.id, "deleted": True}, out)
                print(f"Deleted persona {args.id}", file=out)
                return 0
        elif resource == "conversations":
            if action == "create":
                return await _create_conversation(client, args, tavus, as_json, out, err)
            if action == "list":
                page = await client.list_conversations(limit=args.limit, page=args.page, status=args.status)
                if as_json:
                    return _print_json(page, out)
                _print_table(page, ["conversation_id", "status", "conversation_name", "persona_id",
                                    "replica_id", "created_at"], "conversation", out)
                return 0
            if action == "get":
                body = await client.get_conversation(args.id, verbose=args.verbose)
                return _print_json(body, out) if as_json else _print_object(body, out)
            if action == "end":
                ended_now = await client.end_conversation(args.id)
                if as_json:
                    return _print_json({"conversation_id": args.id, "status": "ended",
                                        "already_ended": not ended_now}, out)
                print(f"Ended conversation {args.id}" if ended_now
                      else f"Conversation {args.id} had already ended", file=out)
                return 0
            if action == "delete":
                await client.delete_conversation(args.id)
                if as_json:
                    return _print_json({"conversation_id": args.id, "deleted": True}, out)
                print(f"Deleted conversation {args.id}", file=out)
                return 0
    print(f"unknown command: tavus {resource} {action}", file=err)
    return 2


async def _create_conversation(client: TavusClient, args: argparse.Namespace, tavus: Any, as_json: bool,
                               out: TextIO, err: TextIO) -> int:
    persona_id = args.persona or tavus.persona_id
    if not persona_id:
        print("No persona: pass --persona ID or set tavus.persona_id "
              "(create one with: echo-relay tavus personas create)", file=err)
        return 2
    properties = {
        "max_call_duration": args.max_call_duration or tavus.max_call_duration,
        "participant_left_timeout": tavus.participant_left_timeout,
        "participant_absent_timeout": tavus.participant_absent_timeout,
        "language": args.language,
    }
    body = await client.create_conversation(
        persona_id,
        replica_id=args.replica or tavus.replica_id,
        conversation_name=args.name or tavus.conversation_name,
        callback_url=args.callback_url,
        test_mode=True if (args.test_mode or tavus.test_mode) else None,
        require_auth=True if args.require_auth else None,
        properties=properties,
    )
    if as_json:
        return _print_json(body, out)
    print(f"Created conversation {body.get('conversation_id')} ({body.get('status', '?')})", file=out)
    for name in ("conversation_url", "conversation_name", "persona_id", "replica_id", "meeting_token"):
        if body.get(name):
            print(f"  {name}: {body[name]}", file=out)
    if body.get("status") == "active":
        print(f"  end it with: echo-relay tavus conversations end {body.get('conversation_id')}", file=out)
    return 0


# ------------------------------------------------------------------------------------- output
def _print_json(data: Any, out: TextIO) -> int:
    print(json.dumps(data, indent=2, ensure_ascii=False), file=out)
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _print_object(obj: dict[str, Any], out: TextIO) -> int:
    width = max((len(k) for k in obj), default=0)
    for key, value in obj.items():
        print(f"{key.ljust(width)}  {_cell(value)}", file=out)
    return 0


def _print_table(page: dict[str, Any], columns: list[str], noun: str, out: TextIO) -> None:
    items = [x for x in page.get("data", []) if isinstance(x, dict)]
    rows = [[_cell(item.get(c)) for c in columns] for item in items]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(), file=out)
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip(), file=out)
    total = page.get("total_count")
    shown = f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"
    print(f"({shown} of {total})" if isinstance(total, int) and total != len(items) else f"({shown})",
          file=out)


# --------------------------------------------------------------------------------- standalone
def build_parser() -> argparse.ArgumentParser:
    """A standalone `echo-relay` parser holding only the `tavus` commands (used by `main`)."""
    parser = argparse.ArgumentParser(prog="echo-relay", description="echo-relay Tavus commands")
    parser.add_argument("--config", metavar="PATH", help="config file (default: built-in defaults)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_tavus_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None, settings: Any = None) -> int:
    """Run `tavus ...` commands: `main(["tavus", "personas", "list"])`. Loads settings unless given."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if settings is None:
        from pipeline.config import ConfigError, load_settings

        try:
            settings = load_settings(args.config)
        except ConfigError as exc:
            print(f"Config error: {exc}", file=sys.stderr)
            return 2
    return run_tavus(args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
