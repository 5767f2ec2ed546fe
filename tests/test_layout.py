"""The package layout's promises: the core never imports the application, every
op's backends are registered side by side, and the registry is what dispatch reads."""

import ast
import importlib
import importlib.util
import pathlib
import subprocess
import sys

import pytest

from ddvae_fast import backends

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ROOT / "ddvae_fast"
APP_EXTRAS = ("rdkit", "matplotlib", "tqdm")


def _core_modules():
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE)
        if rel.parts[0] == "seqvae":
            continue
        yield path, "ddvae_fast." + ".".join(rel.with_suffix("").parts).removesuffix(".__init__")


def _imported_names(path):
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module


@pytest.mark.parametrize("path, module", list(_core_modules()), ids=lambda x: str(x))
def test_core_module_imports_neither_the_application_nor_its_extras(path, module):
    for name in _imported_names(path):
        assert not name.startswith("ddvae_fast.seqvae"), f"{module} imports {name}"
        assert name.split(".")[0] not in APP_EXTRAS, f"{module} imports {name}"


def test_core_runs_without_the_application_extras():
    """In a process where rdkit, matplotlib and tqdm cannot be imported, every core
    module imports and the README's loss and sampler examples run; the application
    raises an ImportError that names the extra."""
    modules = [m for _, m in _core_modules() if not m.endswith("triton")]
    script = f"""
import sys
for name in {APP_EXTRAS!r}:
    sys.modules[name] = None  # makes `import name` raise ImportError
import importlib, torch
for module in {modules!r}:
    importlib.import_module(module)
import ddvae_fast as ddf
logits = torch.randn(8, 20, 30, requires_grad=True)
target = torch.randint(0, 30, (8, 20))
ddf.relaxed_argmax_loss(logits, target, tau=0.1).backward()
out = ddf.decoder_loss(logits, target, 0.1)
sampler = ddf.RejectionSampler("tricube", seed=0)
sampler.rsample(torch.zeros(4, 2), torch.ones(4, 2))
try:
    importlib.import_module("ddvae_fast.seqvae.model")
except ImportError as exc:
    assert "app" in str(exc), exc
else:
    raise AssertionError("the application imported without its extras")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("op", sorted(backends.REGISTRY))
def test_every_op_has_every_backend_and_each_row_resolves(op):
    assert tuple(backends.REGISTRY[op]) == backends.BACKENDS
    for backend in backends.available_backends():
        assert callable(backends.implementation(op, backend))


def test_adding_a_backend_doc_names_every_registry_op():
    text = (ROOT / "docs" / "adding_a_backend.md").read_text()
    for op, rows in backends.REGISTRY.items():
        assert op in text
        for impl in rows.values():
            module = impl.target.split(":")[0]
            assert importlib.util.find_spec(module) is not None, module


def test_every_smoothing_kernel_is_in_every_place():
    """docs/adding_a_smoothing_kernel.md lists the places; each must know every kernel."""
    from ddvae_fast.distributions import PROPOSAL_CLASSES, PROPOSALS
    from ddvae_fast.distributions.smoothing import KERNELS

    assert tuple(PROPOSAL_CLASSES) == PROPOSALS
    cpp_source = (ROOT / "csrc" / "sampler.cpp").read_text()
    triton_source = (ROOT / "kernels" / "rejection_sampler.py").read_text()
    constants_test = (ROOT / "tests" / "test_smoothing_kernels.py").read_text()
    for name in KERNELS:
        assert f'"{name}"' in cpp_source, f"csrc/sampler.cpp does not know {name!r}"
        assert f'"{name}"' in triton_source, f"kernels/rejection_sampler.py does not know {name!r}"
        assert f'"{name}"' in constants_test, f"tests/test_smoothing_kernels.py lacks {name!r}"
