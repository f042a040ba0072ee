"""The GPU command (README, experiments/run_h200.sh, which run_h100.sh runs) selects the CUDA tests with ``-k cuda``;
CI has no GPU and skips them. A CUDA-only test whose id lacks "cuda" would run nowhere: two did, unnoticed
(``test_graphed_predictor_...``: skipped in CI, filtered out on the GPU)."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _cuda_only(node: ast.FunctionDef) -> bool:
    """Decorated with a skip or skipif whose condition reads ``cuda.is_available``."""
    return any("cuda.is_available" in ast.unparse(d) and "skip" in ast.unparse(d) for d in node.decorator_list)


def test_every_cuda_only_test_is_selected_by_the_gpu_commands_filter():
    unselected = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test") and _cuda_only(node) \
                    and "cuda" not in node.name:
                unselected.append(f"{path.name}::{node.name}")
    assert not unselected, f"CUDA-only tests that `-k cuda` does not select (name them test_cuda_...): {unselected}"


def test_the_gpu_commands_name_every_file_holding_cuda_tests():
    """Each file with a CUDA-only test or a cuda device parameter is in the GPU commands' file lists."""
    root = TESTS.parent
    holding = {p.name for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name
               and ("cuda.is_available" in p.read_text())}
    for command in (root / "README.md", root / "experiments" / "run_h200.sh"):
        text = command.read_text()
        line = next(x for x in text.split("python -m pytest")[1:] if "-k cuda" in x.split("\n\n")[0])
        listed = set(__import__("re").findall(r"tests/(test_\w+\.py)", line.split("\n\n")[0]))
        assert holding <= listed, f"{command.name}: the GPU test command leaves out {sorted(holding - listed)}"
