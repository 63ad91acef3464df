"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_example_runs_as_written() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    selection = namespace["selection"]
    pool = namespace["pool"]
    assert len(selection.indices) == 10 and pool.num_labelled == 30  # type: ignore[attr-defined]
    assert set(selection.indices.tolist()) <= set(selection.scored_indices.tolist())  # type: ignore[attr-defined]
