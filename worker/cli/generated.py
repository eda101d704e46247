"""Commands generated from a task's payload model, so the CLI and the task cannot disagree.

A :class:`TaskCommand`'s arguments and options are the fields of the task's kwargs model (the
contract's, ``token_worker_client.models`` through ``models.schemas``): names, types, bounds,
defaults and help come from the model, and what the command was given is validated by that model
exactly as the worker validates a message (strict, through JSON). The model is imported only
when the command's parameters are first needed (parsing, its own ``--help``), never for
``tokens --help``.
"""

from __future__ import annotations

import importlib
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import click

from worker.cli.group import run_task

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from models.schemas import Payload

# Help for fields that mean the same in every command (the models carry no descriptions yet;
# a field's ``description`` in the model, when it has one, is used first).
FIELD_HELP = {
    "allow_overdraft": "Let the balance go below zero.",
    "end_date": "Exclusive, ISO 8601 (UTC unless it names an offset).",
    "expires_at": "ISO 8601, in the future; without it the grant never expires.",
    "grant_kind": "The grant the tokens become.",
    "idempotency_key": "Repeating the command with this key changes nothing more.",
    "include_ended": "Also depleted and expired grants.",
    "limit": "At most N.",
    "metadata": "A JSON object, stored with the ledger entry.",
    "operation_type": "A name from the price list (TOKENS_PRICES).",
    "original_entry_id": "The debit or charge refunded; all its refunds together never exceed it.",
    "overcapture_limit": "How far past the hold a capture may go (into debt if need be).",
    "priority": "0 is spent first. Default: by kind (purchased 50, promo 20).",
    "start_date": "Inclusive, ISO 8601 (UTC unless it names an offset).",
    "subscription_expires_at": "ISO 8601; without it a paid tier never expires.",
    "tier": "A tier name (TOKENS_TIERS).",
}


class JsonObject(click.ParamType[Any, Any]):
    """A JSON text, parsed (the model then checks it is an object it accepts)."""

    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError as exc:
            self.fail(f"not JSON ({exc})", param, ctx)


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """The type under ``X | None`` and ``Annotated[...]``, and the constraints met on the way."""
    from pydantic.fields import FieldInfo

    constraints: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation, *extra = typing.get_args(annotation)
            for item in extra:
                constraints.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        elif origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation, constraints


def _click_type(info: FieldInfo) -> tuple[click.ParamType[Any, Any], str | None]:
    """The click type showing a field's type and bounds, and a metavar where it helps."""
    kind, constraints = _unwrap(info.annotation)
    if typing.get_origin(kind) is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(kind)]), None
    if kind is int:
        bounds = {type(c).__name__: c for c in [*info.metadata, *constraints]}
        low = bounds["Ge"].ge if "Ge" in bounds else None
        high = bounds["Le"].le if "Le" in bounds else None
        return (click.INT if low is None and high is None else click.IntRange(low, high)), None
    if kind is dict or typing.get_origin(kind) is dict:
        return JsonObject(), "JSON"
    if kind is datetime:
        return click.STRING, "ISO8601"
    return click.STRING, None


def _default(info: FieldInfo) -> Any:
    # A default built by a factory (metadata's {}) is left to the model: the option sends nothing.
    if info.is_required() or info.default_factory is not None:
        return None
    return info.default


@dataclass(frozen=True)
class Fields:
    """How a task's payload model becomes a command's parameters."""

    payload: str  # the model's name in models.schemas
    arguments: tuple[str, ...] = ()  # fields taken as positional arguments, in this order
    names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # option spellings
    defaults: Mapping[str, Any] = field(default_factory=dict)  # where the command's differ
    helps: Mapping[str, str] = field(default_factory=dict)  # what a field means here

    def model(self) -> type[Payload]:
        from models import schemas

        return cast("type[Payload]", getattr(schemas, self.payload))

    def parameters(self) -> list[click.Parameter]:
        fields = self.model().model_fields
        found: list[click.Parameter] = []
        for name in self.arguments:
            kind, metavar = _click_type(fields[name])
            found.append(click.Argument([name], type=kind, metavar=metavar))
        found += [self._option(n, info) for n, info in fields.items() if n not in self.arguments]
        return found

    def _option(self, name: str, info: FieldInfo) -> click.Option:
        default = self.defaults.get(name, _default(info))
        help_text = self.helps.get(name) or info.description or FIELD_HELP.get(name)
        spelled = f"--{name.replace('_', '-')}"
        if _unwrap(info.annotation)[0] is bool:
            flag = spelled if not default else f"{spelled}/--no-{spelled[2:]}"
            decls = self.names.get(name, (flag,))
            return click.Option([*decls, name], is_flag=True, default=default, help=help_text)
        kind, metavar = _click_type(info)
        # No default at all rather than None, which click 8.5 takes as a value given.
        given = {} if default is None else {"default": default, "show_default": True}
        return click.Option(
            [*self.names.get(name, (spelled,)), name],
            type=kind,
            metavar=metavar,
            required=info.is_required(),
            help=help_text,
            **given,
        )

    def validate(self, ctx: click.Context, given: dict[str, Any]) -> Payload:
        """``given`` as the worker reads a task's kwargs (strictly, through JSON); a bad value is
        a usage error naming its parameter."""
        from pydantic import ValidationError

        try:
            raw = json.dumps(given, allow_nan=False)
        except ValueError as exc:
            raise click.UsageError(f"Invalid value: not JSON ({exc})", ctx) from None
        try:
            return self.model().model_validate_json(raw, strict=True)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            where = errors[0]["loc"][:1]
            reasons = [
                e["msg"].removeprefix("Value error, ") for e in errors if e["loc"][:1] == where
            ]
            param = next((p for p in ctx.command.get_params(ctx) if (p.name,) == where), None)
            raise click.BadParameter("; ".join(reasons), ctx, param) from None


class TaskCommand(click.Command):
    """A command whose parameters are a payload model's fields (then any of its own). Its ``run``
    gets the validated payload, then the values of its own parameters."""

    def __init__(
        self,
        name: str,
        fields: Fields,
        run: Callable[..., None],
        params: list[click.Parameter] | None = None,
        help: str | None = None,
        task: str | None = None,
        call: str | None = None,
    ) -> None:
        self.fields = fields
        self._built: list[click.Parameter] | None = None
        super().__init__(name, params=params, help=help)
        self.run = run
        self.task = task  # the task it mirrors...
        self.call = call  # ...and the domain function both run ("module:function")

    @property
    def params(self) -> list[click.Parameter]:
        if self._built is None:
            self._built = [*self.fields.parameters(), *self._declared]
        return self._built

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._declared = list(value)
        self._built = None

    def invoke(self, ctx: click.Context) -> Any:
        names = self.fields.model().model_fields
        given = {k: v for k, v in ctx.params.items() if k in names and v is not None}
        own = {k: v for k, v in ctx.params.items() if k not in names}
        return ctx.invoke(self.run, self.fields.validate(ctx, given), **own)


def task_command(
    group: click.Group, name: str, fields: Fields
) -> Callable[[Callable[..., None]], TaskCommand]:
    """A decorator: the function runs the command, given the validated payload and the values of
    the ``click.option``\\ s it is decorated with."""

    def decorate(run: Callable[..., None]) -> TaskCommand:
        own = list(reversed(getattr(run, "__click_params__", [])))
        command = TaskCommand(name, fields, run, own, help=run.__doc__)
        group.add_command(command)
        return command

    return decorate


def values(payload: Payload) -> dict[str, Any]:
    """The payload's fields as keyword arguments (the domain's parameters have the same names)."""
    return {name: getattr(payload, name) for name in type(payload).model_fields}


def mirror(
    group: click.Group,
    name: str,
    task: str,
    call: str,
    help: str,
    fields: Fields,
    params: list[click.Parameter] | None = None,
) -> TaskCommand:
    """``tokens NAME``: what the task ``task`` does, ``call(session, **payload)`` in one
    transaction, its result (or refusal) printed as the task returns it."""

    def run(payload: Payload, **_own: Any) -> None:
        module, _, function = call.partition(":")
        action = getattr(importlib.import_module(module), function)
        run_task(task, action, **values(payload))

    command = TaskCommand(name, fields, run, params, help=help, task=task, call=call)
    group.add_command(command)
    return command
