"""YAML as every configuration file of the project reads it: PyYAML's safe loader, refusing a key given twice in
one mapping. The plain loader keeps the last value silently, so a scenario with ``cache_slots`` twice ran one
of them without a word. The refusal is a ``yaml.YAMLError`` (a ``ConstructorError`` naming the key and both
lines), so every reader's "not valid YAML" message reports it as it reports any other syntax error."""
from __future__ import annotations

import yaml
from yaml.constructor import ConstructorError


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises ConstructorError on a duplicate mapping key."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:         # an unhashable key: the base class reports it
                    break
                if first is not key_node:
                    raise ConstructorError("while constructing a mapping", node.start_mark,
                                           f"found key {key!r} a second time (first at line "
                                           f"{first.start_mark.line + 1}): give each key once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(stream):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (module docstring)."""
    return yaml.load(stream, Loader=UniqueKeyLoader)
