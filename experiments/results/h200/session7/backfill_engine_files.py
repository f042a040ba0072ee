"""Record, in each engine result of the validation bundle, the digests of the engine files that measured it
(``engine_files``, what results written since session 7 record themselves), so that a later checkout's report
names the files changed since the runs. The bundle was measured at ffd1dd8; its files' digests come from that
commit, computed with the current ``validation/store.py`` (the engine's code digest there is 24c04212..., the
one the results are keyed by: ``session7/rekey.py``):

    git worktree add /tmp/wt ffd1dd8 && cp validation/store.py /tmp/wt/validation/store.py
    (cd /tmp/wt && PYTHONPATH=/tmp/wt python -c "import json, validation.store as s; \\
        json.dump(s.engine_files(), open('/tmp/files_ffd1dd8.json', 'w'), indent=1, sort_keys=True)")
    # kept as session7/engine_files_ffd1dd8.json
    python experiments/results/h200/session7/backfill_engine_files.py experiments/results/h200/validation \\
        experiments/results/h200/session7/engine_files_ffd1dd8.json
"""
import json
import sys
from pathlib import Path

from validation.store import Store

out, files = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
store = Store(out)
done = 0
for path in sorted((out / "engine").glob("*/*.json")):
    result = store.read(path)
    if result.get("engine_files"):
        continue
    result["engine_files"] = files
    store.write(path, result)
    done += 1
print(f"recorded the engine files of {done} results in {out}")
