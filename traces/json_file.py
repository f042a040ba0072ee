"""A result file's JSON object read back, or the reason it holds none, in words.

The sweep's rows and perf records (``experiments.results``) and validate's store (``validation.store``) write
their files atomically (``traces.io.atomic_write``), yet a file can still be damaged afterwards (a full disk, a
copy cut short, an edit); both name such a file in one line and treat it as absent. Kept apart from
``traces.io``, which the engine imports: this is no part of the engine's code digest.
"""
from __future__ import annotations

import json
from pathlib import Path


def json_object(path: Path) -> tuple[dict | None, str | None]:
    """(the JSON object in the file ``path``, None) or (None, why it holds none: unreadable, not valid JSON, not
    an object)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as err:
        return None, f"cannot be read ({err.strerror or err})"
    except ValueError as err:       # JSONDecodeError (a file cut short), UnicodeDecodeError
        return None, f"not valid JSON ({err})"
    if not isinstance(data, dict):
        return None, f"not a JSON object (a {type(data).__name__})"
    return data, None
