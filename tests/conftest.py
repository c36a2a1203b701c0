"""Shared fixtures: a tokenizer trained here and tiny GPT-2 models built from configs (no network)."""
from __future__ import annotations

import atexit
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FINEGRAIN_PROGRESS", "0")


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_run():
    """benchmarks/run.py as a module (its directory on sys.path while a test module uses it)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCH))

def _declared_entry_points_missing_from_install() -> None:
    """Make the entry points that pyproject.toml declares visible when the installed metadata predates them.

    An editable install records the entry points of the pyproject.toml it was made from; a source tree
    that added one since (or a run with PYTHONPATH=src and no install) would not see it until a
    reinstall. The missing ones are written to a stand-in distribution on sys.path and PYTHONPATH (for
    the commands tests start), so the tests run what pyproject.toml declares. Nothing is done when the
    install is up to date.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10: test against the installed metadata as it is
        return
    from importlib.metadata import PackageNotFoundError, distribution

    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = declared["project"].get("entry-points", {})
    try:
        installed = {(ep.group, ep.name, ep.value) for ep in distribution("finegrain").entry_points}
    except PackageNotFoundError:
        installed = set()
    missing = {group: {n: v for n, v in eps.items() if (group, n, v) not in installed} for group, eps in declared.items()}
    text = "".join(f"[{group}]\n" + "".join(f"{n} = {v}\n" for n, v in eps.items()) for group, eps in missing.items()
                   if eps)
    if not text:
        return
    root = Path(tempfile.mkdtemp(prefix="finegrain-entry-points-"))
    atexit.register(shutil.rmtree, root, True)
    info = root / "finegrain_source_entry_points-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: finegrain-source-entry-points\nVersion: 0\n")
    (info / "entry_points.txt").write_text(text)
    sys.path.append(str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(root)]))


_declared_entry_points_missing_from_install()


def _hypothesis_storage_in_a_temporary_directory() -> None:
    """Hypothesis keeps its example database and caches in ``./.hypothesis`` (the repo root in CI):
    point it at a temporary directory removed at exit, unless HYPOTHESIS_STORAGE_DIRECTORY chooses one."""
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:  # the tests that need hypothesis fail on their own import
        return
    if os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        return
    root = tempfile.mkdtemp(prefix="finegrain-hypothesis-")
    atexit.register(shutil.rmtree, root, True)
    set_hypothesis_home_dir(root)


_hypothesis_storage_in_a_temporary_directory()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CORPUS = [
    "The capital of France is Paris. Paris is a large city with many museums.",
    "Please answer in three short sentences and be polite to the user.",
    "To stay safe, never mix bleach with ammonia; open a window and wear gloves.",
    "You are stupid for asking that. Just figure it out yourself.",
    "Here is a list: apples, bananas, cherries, dates and elderberries.",
    "Question: how tall is Mount Everest? Answer: about 8,849 metres above sea level.",
    "I am sorry, but I cannot help with that request because it is dangerous.",
    "Step 1: preheat the oven. Step 2: mix the flour and sugar. Step 3: bake for 20 minutes.",
]


def require_shared(*parts: str) -> Path:
    """Path of a file under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not present: {p} (see ../shared/data/README.md)")
    return p


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from finegrain.scratch import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS * 20, vocab_size=400)


def make_tiny_model(tokenizer, head: str = "causal", seed: int = 0, **cfg):
    """A 2-layer GPT-2 with the given head ('causal', 'token', 'sequence') for ``tokenizer``."""
    import torch
    import transformers
    from finegrain.scratch import tiny_gpt2_config

    torch.manual_seed(seed)
    config = tiny_gpt2_config(len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **cfg)
    cls = {"causal": transformers.GPT2LMHeadModel, "token": transformers.GPT2ForTokenClassification,
           "sequence": transformers.GPT2ForSequenceClassification}[head]
    return cls(config)


@pytest.fixture(scope="module")
def sharp_model(tiny_tokenizer):
    """A tiny GPT-2 whose matrices are scaled up, so greedy decoding does not just repeat one token."""
    import torch

    m = make_tiny_model(tiny_tokenizer, "causal", seed=0).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return m


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("single_thread")``): its models are
    tiny, and on a shared 2-core machine two threads are ~5x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model_factory(tiny_tokenizer):
    return lambda head="causal", seed=0, **cfg: make_tiny_model(tiny_tokenizer, head, seed, **cfg)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate fixes the precision once per process: reset its state before and after a bf16 run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
