"""What a request constrains its output to, as StructuredOutputsParams for model/constraints.py
to compile: response_format / guided_* / structured_outputs, and the tool-call grammar."""

from __future__ import annotations

import json
from typing import Any

from scheduler import StructuredOutputsParams
from scheduler.errors import SamplingParamsError
from server.tool_calls import CALL_CLOSE, CALL_OPEN

# vLLM's guided-decoding fields: guided_KIND, KIND as in `structured_outputs`
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def structured_outputs(req: Any) -> StructuredOutputsParams | None:
    """The one decoding constraint a completions or chat request asks for (response_format,
    guided_*, structured_outputs); a 400 for two."""
    asked = [(name.removeprefix("guided_"), getattr(req, name), name) for name in _GUIDED]
    rf = req.response_format
    if rf is not None and rf.get("type") != "text":
        kind, js = rf.get("type"), rf.get("json_schema")
        if kind not in ("json_object", "json_schema"):
            raise SamplingParamsError(
                "response_format type must be 'text', 'json_object' or 'json_schema', "
                f"got {kind!r}",
                "response_format",
            )
        schema = js.get("schema", js.get("json_schema")) if isinstance(js, dict) else None
        if kind == "json_schema" and not isinstance(schema, dict):
            raise SamplingParamsError(
                "response_format json_schema needs json_schema.schema (an object)",
                "response_format",
            )
        spec = ("json", schema) if kind == "json_schema" else ("json_object", True)
        asked.insert(0, (*spec, "response_format"))
    for key, value in (req.structured_outputs or {}).items():
        if key not in ("json", "json_object", "regex", "choice", "grammar"):
            raise SamplingParamsError(
                f"structured_outputs.{key} is not supported: use json, json_object, regex, "
                "choice or grammar",
                "structured_outputs",
            )
        asked.append((key, value, "structured_outputs"))
    found = [_constraint(*a) for a in asked if a[1] is not None and a[1] is not False]
    if len(found) > 1:
        raise SamplingParamsError(
            "only one constraint may be given, got "
            + ", ".join(f"{c.param} ({c.kind})" for c in found),
            found[1].param,
        )
    return found[0] if found else None


def _constraint(kind: str, value: Any, param: str) -> StructuredOutputsParams:
    """A guided_* / structured_outputs value → a constraint spec, checked for its shape."""
    if kind == "json_object":
        return StructuredOutputsParams("json_object", "", param)
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise SamplingParamsError(f"{param} is not valid JSON: {e}", param) from e
        if not isinstance(value, dict):
            raise SamplingParamsError(f"{param} must be a JSON schema object", param)
        return StructuredOutputsParams("json", json.dumps(value), param)
    if kind == "choice":
        strings = isinstance(value, list) and all(isinstance(c, str) and c for c in value)
        if not strings or not value:
            raise SamplingParamsError(
                f"{param} must be a non-empty list of non-empty strings", param
            )
        return StructuredOutputsParams("choice", json.dumps(value), param)
    if not isinstance(value, str) or not value:
        raise SamplingParamsError(f"{param} must be a non-empty string", param)
    return StructuredOutputsParams(kind, value, param)


def closed(schema: Any) -> Any:
    """`additionalProperties: false` where unset: a small model cannot invent keys for ever."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def call_schema(function: dict[str, Any], args_key: str = "arguments") -> dict[str, Any]:
    """One call as a JSON object: this function's name, then its arguments' schema."""
    params = closed(function.get("parameters") or {"type": "object", "properties": {}})
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, args_key: params},
        "required": ["name", args_key],
        "additionalProperties": False,
        # compact JSON: with free whitespace small models can emit newlines for ever
        "x-guidance": {"whitespace_flexible": False},
    }


def tag(text: str, token_id: int | None) -> str:
    """A tag as a Lark alternative: its text, or its single special token where it has one."""
    return json.dumps(text) if token_id is None else f"({json.dumps(text)} | <[{token_id}]>)"


def functions(tools: list[dict[str, Any]], name: str | None) -> list[dict[str, Any]]:
    """The tools' functions a call may use: all, or the one `tool_choice` names (a 400 if none)."""
    fns = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not fns:
        known = ", ".join(repr(t["function"]["name"]) for t in tools)
        raise SamplingParamsError(
            f"tool_choice names function {name!r}, which is not in tools ({known})",
            "tool_choice",
        )
    return fns


def tool_call_constraint(
    tools: list[dict[str, Any]],
    name: str | None,
    parallel: bool,
    auto: bool = False,
    tag_ids: tuple[int | None, int | None] = (None, None),
) -> StructuredOutputsParams:
    """Calls to `name` or any tool (several if `parallel`); `auto`: free text until the opening
    tag (a lazy trigger), then only calls. `tag_ids`: the tags' special token ids, if any."""
    fns = functions(tools, name)
    if name is not None:
        parallel = False
    open_id, close_id = tag_ids
    # NOTE: no separator between parallel calls: after a newline small models start another call
    more = " call*" if parallel else ""
    if auto:
        head = "head_text" if open_id is None else f"head_text | TEXT <[{open_id}]>"
        start = [
            f"start: TEXT | head args close{more}",
            f"head: {head}",
            f"head_text[lazy]: TEXT {json.dumps(CALL_OPEN)}",
            r"TEXT: /(.|\n)*/",
        ]
    else:
        start = [f"start: call{more}"]
    lines = [
        "%llguidance {}",
        *start,
        "call: open args close",
        f"open: {tag(CALL_OPEN, open_id)}",
        f"close: {tag(CALL_CLOSE, close_id)}",
        "args: " + " | ".join(f"fn_{i}" for i in range(len(fns))),
        *(f"fn_{i}: %json{json.dumps(call_schema(f))}" for i, f in enumerate(fns)),
    ]
    return StructuredOutputsParams("grammar", "\n".join(lines), param="tools")
