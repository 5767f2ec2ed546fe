"""Run the worked examples of docs/integration.md, so the guide and the code cannot drift.

Every ```python block of the page is a complete program with its own
assertions (the training loss falls, the statistics are grouped by the right
dimension, the sampler resumes exactly); each runs in a fresh namespace.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "integration.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)


def test_the_guide_has_its_three_examples():
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"example-{i + 1}")
def test_example_runs(index, one_torch_thread):
    code = compile(BLOCKS[index], f"{GUIDE.name}:example-{index + 1}", "exec")
    before = torch.get_rng_state()
    exec(code, {"__name__": f"integration_example_{index + 1}"})
    torch.set_rng_state(before)  # the examples seed torch; leave other tests unaffected
