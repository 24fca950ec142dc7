"""Reading a configuration file written in YAML so that every mistake names the file and
line: the catalogue (``sluice.catalog``) and the gateway's tiers share it."""

from __future__ import annotations

import yaml

from sluice.settings import ConfigFileError


def compose(text: str, source: str, error: type[ConfigFileError]) -> yaml.Node | None:
    """The document's node tree (line numbers kept), or ``error`` naming the line."""
    try:
        node: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise error(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return node


class LineReader:
    """Reads nodes of one file; what is wrong raises ``error`` as ``file:line: what``."""

    def __init__(self, source: str, error: type[ConfigFileError] = ConfigFileError) -> None:
        self.source = source
        self.error = error

    def at(self, node: yaml.Node) -> str:
        return f"{self.source}:{node.start_mark.line + 1}"

    def fail(self, node: yaml.Node, message: str) -> ConfigFileError:
        return self.error(f"{self.at(node)}: {message}")

    def mapping(
        self, node: yaml.Node, what: str, allowed: set[str] | None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """The keys of a mapping with their key and value nodes; ``allowed`` (when given)
        the only keys it may have, each at most once."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, f"a key of {what}")
            if allowed is not None and key not in allowed:
                raise self.fail(
                    key_node,
                    f"unknown key {key!r} in {what} (expected {', '.join(sorted(allowed))})",
                )
            if key in out:
                raise self.fail(key_node, f"{key!r} appears twice in {what}")
            out[key] = (key_node, value_node)
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return list(node.value)

    def scalar(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a single value")
        return str(node.value)
